"""Serve the fake LLM provider as a process: ``python -m conveyor.testing.fake_llm``.

Prints the server's URL on the first line of stdout (then the SDK base URLs to stderr)
and serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from conveyor.testing.fake_llm._server import FakeLLMServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m conveyor.testing.fake_llm",
        description="A fake OpenAI/Anthropic provider with deterministic answers.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (0: a free port)")
    args = parser.parse_args(argv)

    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        server = FakeLLMServer(host=args.host, port=args.port).start()
    except OSError as exc:
        sys.stderr.write(f"fake-llm: cannot bind {args.host}:{args.port}: {exc.strerror}\n")
        return 2
    with server:
        sys.stdout.write(server.url + "\n")
        sys.stdout.flush()
        sys.stderr.write(
            f"fake-llm: OPENAI_BASE_URL={server.openai_base_url} "
            f"ANTHROPIC_BASE_URL={server.anthropic_base_url}\n"
        )
        stopping.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
