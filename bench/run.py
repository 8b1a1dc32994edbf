"""``make bench``: Conveyor against Celery, same workload, same machine, same invocation.

The workload is N runs of a 5-step pipeline of no-op ``transform`` steps in a line. For
Conveyor that is the whole system: the embedded broker, the scheduler, step-runner
processes and the run recorder, every event persisted in PostgreSQL. For Celery it is a
chain of 5 no-op tasks over the local Redis with 2 prefork worker processes.

Two phases each:
- latency: runs one after another (nothing else in flight), p50/p95/p99 from trigger to
  the run's completion as the client sees it;
- throughput: N runs triggered at once; runs/s and steps/s from the first trigger to
  the last completion.

For Conveyor also: per-step overhead (p50 run latency / 5: the steps themselves do
nothing), recorder lag (from the last RunCompleted on the bus to the recorder's history
showing every run complete), peak RSS per service process (VmHWM). A scaling series
repeats the throughput phase with 1, 2 and 4 step-runner processes.

Results are printed side by side with ratios and appended to ``bench/results.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
STEPS = 5
PIPELINE = "bench5"
PIPELINE_YAML = f"""
name: {PIPELINE}
description: five no-op transform steps in a line (the benchmark workload)
steps:
""" + "".join(
    f"""  - id: s{i}
    type: transform
    with: {{template: "{i}"}}
"""
    for i in range(1, STEPS + 1)
)


@dataclass
class Result:
    system: str
    runners: int
    runs: int
    seconds: float
    latencies_ms: list[float]
    recorder_lag_s: float | None = None
    rss_mb: dict[str, float] = field(default_factory=dict)
    cpu_ms_per_step: dict[str, float] = field(default_factory=dict)
    """CPU time each process spent per step in the throughput phase."""

    @property
    def runs_per_s(self) -> float:
        return self.runs / self.seconds

    @property
    def steps_per_s(self) -> float:
        return self.runs * STEPS / self.seconds

    def pct(self, q: float) -> float:
        data = sorted(self.latencies_ms)
        if not data:
            return float("nan")
        k = min(len(data) - 1, max(0, round(q / 100 * (len(data) - 1))))
        return data[k]


# --- Conveyor -----------------------------------------------------------------------------


def _peak_rss_mb(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of ``pid`` so far (not its children)."""
    if pid is None:
        return float("nan")
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return float("nan")


def _infra(match: list[str]) -> Any:
    """A function listing the processes whose command line contains every string of
    ``match`` (the broker, the database server's backends for the bench database)."""
    import psutil

    def find() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            line = " ".join(proc.info["cmdline"] or ())
            if all(m in line for m in match):
                found.append(proc)
        return found

    return find


def _cpu_of(procs: list[Any]) -> dict[int, float]:
    """CPU seconds so far of each process (that still exists)."""
    import psutil

    out = {}
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            out[proc.pid] = times.user + times.system
    return out


def _cpu_spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two ``_cpu_of`` readings; a process new since counts whole."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def _start_profilers(pids: dict[str, int | None]) -> list[subprocess.Popen[bytes]]:
    """``BENCH_PROFILE=scheduler,run-recorder``: py-spy records those processes during the
    throughput phase, to ``bench/profile-NAME.txt`` (collapsed stacks)."""
    wanted = [n for n in os.environ.get("BENCH_PROFILE", "").split(",") if n]
    spy = Path(sys.executable).with_name("py-spy")
    return [
        subprocess.Popen(
            [
                str(spy),
                "record",
                "-p",
                str(pids[name]),
                "-f",
                "raw",
                "--nonblocking",
                "-o",
                str(HERE / f"profile-{name}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name in wanted
        if pids.get(name)
    ]


def _stop_profilers(profilers: list[subprocess.Popen[bytes]]) -> None:
    for profiler in profilers:
        profiler.send_signal(signal.SIGINT)
    for profiler in profilers:
        profiler.wait(30)


@contextlib.contextmanager
def _fresh_database() -> Iterator[str]:
    from conveyor.cli import stack as _stack

    server = _stack.local_postgres_url()
    if server is None:
        raise SystemExit("bench: needs a PostgreSQL server (CONVEYOR_DATABASE_URL or :5432)")
    name = f"bench_{uuid.uuid4().hex[:8]}"
    url = _stack.create_database(server, name)
    try:
        yield url
    finally:
        _stack.drop_database(server, name)


async def _drive_conveyor(
    bootstrap: str,
    prefix: str,
    database_url: str,
    *,
    runs: int,
    latency_runs: int,
    pids: dict[str, int | None],
    cpu: dict[str, float],
    infra: dict[str, Any] | None = None,
) -> tuple[list[float], float, float, float]:
    """(latencies ms, throughput seconds, recorder lag s, seconds until the recorder caught up)."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from floor import positioned
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    from conveyor.contracts import RunRequested, Topics
    from conveyor.runtime.database import database_url as sa_url

    topics = Topics(prefix)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    consumer = AIOKafkaConsumer(
        topics.runs_events,
        bootstrap_servers=bootstrap,
        auto_offset_reset="latest",
        fetch_max_wait_ms=1,
        enable_auto_commit=False,
    )
    await producer.start()
    await consumer.start()
    done: dict[uuid.UUID, float] = {}
    waiters: dict[uuid.UUID, asyncio.Future[float]] = {}

    async def listen() -> None:
        async for record in consumer:
            try:
                event = json.loads(record.value)
                kind = event["type"]
                if kind not in ("RunCompleted", "RunFailed", "RunCancelled"):
                    continue
                run_id = uuid.UUID(event["run_id"])
            except (ValueError, KeyError, TypeError):
                continue
            if kind != "RunCompleted":
                print(f"  ! run {run_id} ended {kind}", file=sys.stderr)
            now = time.perf_counter()
            done.setdefault(run_id, now)
            waiter = waiters.pop(run_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(now)

    listener = asyncio.create_task(listen())
    await positioned(consumer)  # before the first trigger

    async def trigger() -> tuple[uuid.UUID, float]:
        request = RunRequested(pipeline=PIPELINE, input={}, run_id=uuid.uuid4())
        assert request.run_id is not None
        sent = time.perf_counter()
        await producer.send(
            topics.runs_requested,
            request.model_dump_json().encode(),
            key=str(request.run_id).encode(),
            headers=[("content-type", b"application/json")],
        )
        return request.run_id, sent

    try:
        # warm up: the first runs pay for connections, caches and partition assignment
        for _ in range(5):
            run_id, _sent = await trigger()
            waiters[run_id] = asyncio.get_running_loop().create_future()
            await asyncio.wait_for(waiters[run_id], 60)

        profiles = _start_profilers(pids)
        latencies = []
        for _ in range(latency_runs):
            loop = asyncio.get_running_loop()
            future: asyncio.Future[float] = loop.create_future()
            run_id = uuid.uuid4()
            request = RunRequested(pipeline=PIPELINE, input={}, run_id=run_id)
            waiters[run_id] = future
            sent = time.perf_counter()
            await producer.send_and_wait(
                topics.runs_requested,
                request.model_dump_json().encode(),
                key=str(run_id).encode(),
                headers=[("content-type", b"application/json")],
            )
            finished = await asyncio.wait_for(future, 60)
            latencies.append((finished - sent) * 1000)
        print(f"  latency p50 {statistics.median(latencies):.1f} ms", flush=True)

        ids = [uuid.uuid4() for _ in range(runs)]
        cpu_before = {name: _cpu_s(pid) for name, pid in pids.items()}
        infra_before = {name: _cpu_of(find()) for name, find in (infra or {}).items()}
        first = time.perf_counter()
        for run_id in ids:
            request = RunRequested(pipeline=PIPELINE, input={}, run_id=run_id)
            await producer.send(
                topics.runs_requested,
                request.model_dump_json().encode(),
                key=str(run_id).encode(),
                headers=[("content-type", b"application/json")],
            )
        await producer.flush()
        deadline = time.monotonic() + max(180.0, runs * 2.0)
        report_at = time.monotonic() + 5
        while not all(r in done for r in ids):
            if time.monotonic() > report_at:
                report_at += 5
                print(f"  … {sum(1 for r in ids if r in done)}/{runs} runs done", flush=True)
            if time.monotonic() > deadline:
                missing = sum(1 for r in ids if r not in done)
                raise SystemExit(f"bench: {missing} of {runs} runs did not finish in time")
            await asyncio.sleep(0.01)
        last = max(done[r] for r in ids)
        infra_after = {name: _cpu_of(find()) for name, find in (infra or {}).items()}
        _stop_profilers(profiles)
        seconds = last - first

        deadline = time.monotonic() + max(180.0, runs * 2.0)
        engine = create_async_engine(sa_url(database_url))
        try:
            id_list = [str(r) for r in ids]
            while True:
                async with engine.connect() as conn:
                    count = await conn.scalar(
                        text(
                            "SELECT count(*) FROM recorder.runs "
                            "WHERE status = 'succeeded' AND id = ANY(CAST(:ids AS uuid[]))"
                        ),
                        {"ids": id_list},
                    )
                if count == runs:
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"bench: the recorder shows {count} of {runs} runs complete")
                await asyncio.sleep(0.02)
            lag = time.perf_counter() - last
            for name, pid in pids.items():
                cpu[name] = (_cpu_s(pid) - cpu_before[name]) / (runs * STEPS) * 1000
            for name, before in infra_before.items():
                spent = _cpu_spent(before, infra_after[name])
                cpu[name] = spent / (runs * STEPS) * 1000
        finally:
            await engine.dispose()
        return latencies, seconds, lag, last - first + lag
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await listener
        await consumer.stop()
        await producer.stop()


def bench_conveyor(
    *, runners: int, runs: int, latency_runs: int, fetch_wait_ms: int | None = None
) -> Result:
    """``fetch_wait_ms``: the services' ``CONVEYOR_KAFKA_FETCH_MAX_WAIT_MS`` (default 5)."""
    from conveyor.cli.up import local_stack

    keep = os.environ.get("BENCH_HOME")
    home_cm = (
        contextlib.nullcontext(keep)
        if keep
        else tempfile.TemporaryDirectory(prefix="conveyor-bench-")
    )
    with home_cm as home, _fresh_database() as db:
        prefix = f"bench{uuid.uuid4().hex[:6]}"
        broker_port = _free_port()
        env = {
            "CONVEYOR_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
            "CONVEYOR_KAFKA_SESSION_TIMEOUT_MS": "6000",
            **(
                {"CONVEYOR_KAFKA_FETCH_MAX_WAIT_MS": str(fetch_wait_ms)}
                if fetch_wait_ms is not None
                else {}
            ),
            "CONVEYOR_KAFKA_HEARTBEAT_INTERVAL_MS": "1500",
        }
        with local_stack(
            services=["scheduler", "step-runner", "run-recorder"],
            runners=runners,
            home=Path(home),
            quiet=True,
            free_ports=True,
            database_url=db,
            topic_prefix=prefix,
            extra_env=env,
            fake_llm=False,
            broker_port=broker_port,
            api_url=f"http://127.0.0.1:{_free_port()}",
            recorder_url=f"http://127.0.0.1:{_free_port()}",
        ) as stack:
            with stack.client() as client:
                client.register_pipeline(PIPELINE_YAML)
            cpu: dict[str, float] = {}
            infra = {
                "broker": _infra(["broker", f"127.0.0.1:{broker_port}"]),
                "postgres": _infra(["postgres:", db.rsplit("/", 1)[1]]),
            }
            latencies, seconds, lag, _ = asyncio.run(
                _drive_conveyor(
                    stack.bootstrap,
                    prefix,
                    db,
                    runs=runs,
                    latency_runs=latency_runs,
                    pids={p.name: p.pid for p in stack.processes},
                    cpu=cpu,
                    infra=infra,
                )
            )
            rss = {p.name: _peak_rss_mb(p.pid) for p in stack.processes}
    return Result("conveyor", runners, runs, seconds, latencies, lag, rss, cpu)


def _free_port() -> int:
    from conveyor.cli.stack import free_port

    return free_port()


# --- Celery -------------------------------------------------------------------------------


def bench_celery(*, runs: int, latency_runs: int) -> Result:
    import psutil
    import redis
    from celery import chain

    sys.path.insert(0, str(HERE))
    import celery_app  # bench/celery_app.py

    redis.Redis.from_url(celery_app.BROKER).flushdb()
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "celery_app",
            "worker",
            "--pool",
            "prefork",
            "-c",
            "2",
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        cwd=HERE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    peak: dict[int, float] = {}
    try:

        def workflow() -> Any:
            return chain(
                celery_app.step.s(None, 1), *(celery_app.step.s(i) for i in range(2, STEPS + 1))
            )

        deadline = time.monotonic() + 60
        while True:  # the worker is up once a chain goes through
            try:
                workflow().apply_async().get(timeout=5)
                break
            except Exception:
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise SystemExit("bench: the Celery worker did not start") from None
        for _ in range(5):
            workflow().apply_async().get(timeout=30)

        latencies = []
        for _ in range(latency_runs):
            sent = time.perf_counter()
            workflow().apply_async().get(timeout=30)
            latencies.append((time.perf_counter() - sent) * 1000)

        workers = [psutil.Process(worker.pid), *psutil.Process(worker.pid).children()]
        redis_server = _infra(["redis-server"])
        before = {"celery": _cpu_of(workers), "redis": _cpu_of(redis_server())}
        first = time.perf_counter()
        results = [workflow().apply_async() for _ in range(runs)]
        for result in results:
            result.get(timeout=max(120.0, runs * 0.5))
        seconds = time.perf_counter() - first
        after = {"celery": _cpu_of(workers), "redis": _cpu_of(redis_server())}
        cpu = {
            name: _cpu_spent(before[name], after[name]) / (runs * STEPS) * 1000 for name in before
        }

        for proc in [psutil.Process(worker.pid), *psutil.Process(worker.pid).children()]:
            peak[proc.pid] = _peak_rss_mb(proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, 15)
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, 9)
            worker.wait()
    rss = {f"celery-{i}": mb for i, mb in enumerate(peak.values())}
    return Result("celery", 2, runs, seconds, latencies, None, rss, cpu)


# --- report -------------------------------------------------------------------------------


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def report(
    conveyor: Result,
    celery: Result,
    scaling: list[Result],
    tuned: Result | None = None,
    tuned_wait: int = 0,
    floor_ms: list[float] | None = None,
) -> str:
    def row(name: str, c: float, k: float, fmt: str, better: str) -> str:
        ratio = c / k if k else float("nan")
        return f"| {name} | {c:{fmt}} | {k:{fmt}} | {ratio:.2f}x ({better}) |"

    lines = [
        f"## {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} — {_machine()}",
        "",
        f"Workload: {conveyor.runs} runs of a {STEPS}-step no-op pipeline at once "
        f"(throughput), {len(conveyor.latencies_ms)} runs one after another (latency). "
        f"Conveyor: scheduler, {conveyor.runners} step-runner processes, recorder, every "
        "event persisted in PostgreSQL, topics with a partition per step-runner (at least "
        f"2: the local stack's rule on the embedded broker). Celery {_celery_version()}: "
        f"chains of {STEPS} "
        "no-op tasks, Redis broker and result backend, 2 prefork workers.",
        "",
        "| | Conveyor | Celery | Conveyor / Celery |",
        "|---|---:|---:|---:|",
        row("runs/s", conveyor.runs_per_s, celery.runs_per_s, ".1f", "higher is better"),
        row("steps/s", conveyor.steps_per_s, celery.steps_per_s, ".1f", "higher is better"),
        row("p50 run latency (ms)", conveyor.pct(50), celery.pct(50), ".1f", "lower is better"),
        row("p95 run latency (ms)", conveyor.pct(95), celery.pct(95), ".1f", "lower is better"),
        row("p99 run latency (ms)", conveyor.pct(99), celery.pct(99), ".1f", "lower is better"),
        row(
            "per-step overhead (ms, p50/5)",
            conveyor.pct(50) / STEPS,
            celery.pct(50) / STEPS,
            ".2f",
            "lower is better",
        ),
        row(
            "CPU per step, all processes (ms)",
            sum(conveyor.cpu_ms_per_step.values()),
            sum(celery.cpu_ms_per_step.values()),
            ".2f",
            "lower is better",
        ),
        *(_floor_lines(floor_ms, conveyor, celery) if floor_ms else []),
        "",
        f"Recorder lag (last RunCompleted on the bus → history complete): "
        f"{(conveyor.recorder_lag_s or 0) * 1000:.0f} ms.",
        "",
        "CPU per step (ms, throughput phase): Conveyor "
        + ", ".join(f"{k} {v:.2f}" for k, v in conveyor.cpu_ms_per_step.items())
        + "; Celery "
        + ", ".join(f"{k} {v:.2f}" for k, v in celery.cpu_ms_per_step.items())
        + " (the broker and the database count: the Tansu broker, the bench database's "
        "PostgreSQL backends, Redis).",
        "",
        "Peak RSS (MB): "
        + ", ".join(f"{k} {v:.0f}" for k, v in {**conveyor.rss_mb, **celery.rss_mb}.items()),
        "",
        "Scaling (throughput phase, step-runner processes → steps/s, ratio to Celery):",
        "",
        "| runners | runs/s | steps/s | vs Celery steps/s | p50 latency (ms) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in scaling:
        lines.append(
            f"| {r.runners} | {r.runs_per_s:.1f} | {r.steps_per_s:.1f} | "
            f"{r.steps_per_s / celery.steps_per_s:.2f}x | {r.pct(50):.1f} |"
        )
    if tuned is not None:
        lines += [
            "",
            f"Fetch wait (the embedded broker holds every fetch this long, so it bounds each "
            f"hop; a shorter wait polls more): 5 ms (default) against {tuned_wait} ms, "
            f"{conveyor.runners} runners:",
            "",
            "| fetch wait | steps/s | vs Celery | p50 latency (ms) | vs Celery "
            "| CPU per step, all (ms) |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for wait, r in (("5 ms", conveyor), (f"{tuned_wait} ms", tuned)):
            lines.append(
                f"| {wait} | {r.steps_per_s:.1f} | {r.steps_per_s / celery.steps_per_s:.2f}x "
                f"| {r.pct(50):.1f} | {r.pct(50) / celery.pct(50):.2f}x "
                f"| {sum(r.cpu_ms_per_step.values()):.2f} |"
            )
    return "\n".join(lines) + "\n"


def _floor_lines(floor_ms: list[float], conveyor: Result, celery: Result) -> list[str]:
    from floor import HOPS

    floor = statistics.median(floor_ms)
    return [
        "",
        f"Broker floor (`bench/floor.py`: the same {HOPS} hops on the embedded broker, two "
        "relay processes in raw aiokafka doing nothing else, the services' 5 ms fetch "
        f"wait): p50 {floor:.1f} ms, {floor / celery.pct(50):.2f}x Celery's run. "
        f"Conveyor's p50 is {conveyor.pct(50) / floor:.2f}x the floor; what Conveyor adds "
        f"is {conveyor.pct(50) - floor:.1f} ms a run, {(conveyor.pct(50) - floor) / STEPS:.1f} "
        "ms a step.",
    ]


def _celery_version() -> str:
    import celery

    return str(celery.__version__)


def main() -> None:
    # a SIGTERM (timeout, CI) must stop the stacks this started, like Ctrl-C does
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=500, help="runs in the throughput phase")
    parser.add_argument("--latency-runs", type=int, default=100)
    parser.add_argument("--runners", type=int, default=2, help="step-runners, main comparison")
    parser.add_argument(
        "--scaling", default="1,2,4", help="runner counts for the scaling series ('' for none)"
    )
    parser.add_argument("--only", choices=["conveyor", "celery"], default=None)
    parser.add_argument("--no-write", action="store_true", help="do not append to results.md")
    parser.add_argument(
        "--floor-runs",
        type=int,
        default=100,
        help="runs of the broker floor (bench/floor.py; 0 for none)",
    )
    parser.add_argument(
        "--tuned-fetch-wait",
        type=int,
        default=1,
        help="also run the main configuration with this fetch wait (ms; 0 for none)",
    )
    args = parser.parse_args()

    celery = None
    if args.only != "conveyor":
        print("celery: running…", flush=True)
        celery = bench_celery(runs=args.runs, latency_runs=args.latency_runs)
        print(
            f"celery: {celery.steps_per_s:.0f} steps/s, p50 {celery.pct(50):.1f} ms, CPU ms/step "
            + ", ".join(f"{k} {v:.2f}" for k, v in celery.cpu_ms_per_step.items()),
            flush=True,
        )
    if args.only == "celery":
        return
    floor_ms = None
    if args.floor_runs:
        from floor import HOPS, broker_floor

        print(f"broker floor ({HOPS} hops, no work): running…", flush=True)
        floor_ms = broker_floor(args.floor_runs)
        print(f"broker floor: p50 {statistics.median(floor_ms):.1f} ms", flush=True)
    print(f"conveyor ({args.runners} runners): running…", flush=True)
    main_result = bench_conveyor(
        runners=args.runners, runs=args.runs, latency_runs=args.latency_runs
    )
    print(
        f"conveyor: {main_result.steps_per_s:.0f} steps/s, p50 {main_result.pct(50):.1f} ms, "
        f"recorder lag {(main_result.recorder_lag_s or 0) * 1000:.0f} ms, CPU ms/step "
        + ", ".join(f"{k} {v:.2f}" for k, v in main_result.cpu_ms_per_step.items()),
        flush=True,
    )
    scaling = []
    for count in [int(c) for c in args.scaling.split(",") if c.strip()]:
        if count == args.runners:
            scaling.append(main_result)
            continue
        print(f"conveyor ({count} runners): running…", flush=True)
        scaling.append(
            bench_conveyor(
                runners=count, runs=args.runs, latency_runs=max(10, args.latency_runs // 5)
            )
        )
    scaling.sort(key=lambda r: r.runners)
    tuned = None
    if args.tuned_fetch_wait:
        print(f"conveyor (fetch wait {args.tuned_fetch_wait} ms): running…", flush=True)
        tuned = bench_conveyor(
            runners=args.runners,
            runs=args.runs,
            latency_runs=args.latency_runs,
            fetch_wait_ms=args.tuned_fetch_wait,
        )
        print(f"conveyor tuned: {tuned.steps_per_s:.0f} steps/s, p50 {tuned.pct(50):.1f} ms")
    if celery is None:
        for r in [main_result, *scaling]:
            print(f"{r.runners} runners: {r.steps_per_s:.1f} steps/s, p50 {r.pct(50):.1f} ms")
        return
    text = report(main_result, celery, scaling, tuned, args.tuned_fetch_wait, floor_ms)
    print()
    print(text)
    if not args.no_write:
        results = HERE / "results.md"
        if not results.exists():
            results.write_text("# Benchmark results (appended by `make bench`)\n\n")
        with results.open("a") as out:
            out.write(text + "\n")
        print(f"appended to {results}")


if __name__ == "__main__":
    main()
