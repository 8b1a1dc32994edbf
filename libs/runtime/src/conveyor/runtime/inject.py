"""``RawMessage``: FastStream's ``KafkaMessage`` annotation, resolved on the event loop.

fast_depends resolves a custom field whose ``use`` is a plain function by running it in a
worker thread (``anyio.to_thread.run_sync``), and FastStream's ``Context`` is one. Every
message handed to a handler annotated ``msg: KafkaMessage`` therefore paid two thread
hops before the handler ran. On a busy 2-core machine a hop waits for the worker thread to
be scheduled, and the profiles showed it on every hop of a run. Resolving the context
is a dictionary lookup: this field does it on the loop.
"""

from __future__ import annotations

from typing import Annotated, Any

from faststream._internal.context import Context  # the field class; faststream.Context builds one
from faststream.kafka.message import KafkaMessage as _KafkaMessage

__all__ = ["RawMessage"]


class _LoopContext(Context):
    async def use(self, /, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        resolved: dict[str, Any] = Context.use(self, **kwargs)
        return resolved


RawMessage = Annotated[_KafkaMessage, _LoopContext("message")]
