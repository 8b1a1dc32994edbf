"""How an http or transform step fails, as data the scheduler can act on.

The tree, rooted in the harness's ``StepError`` (``conveyor.runtime.runner``)::

    StepError
    ├── (harness) TemplateError, MissingSecret, ConfigError, UnknownStepKind, StepTimeout
    └── HttpError                the http step could not get an acceptable answer
        ├── HttpStatusError      a status outside ``expect`` (retryable: 5xx, 408, 429)
        ├── HttpConnectError     nothing accepted the connection (retryable)
        ├── HttpTimeout          connect, read, write or pool timeout (retryable)
        ├── HttpTransportError   the connection broke mid-exchange (retryable)
        └── HttpRequestError     the request itself is wrong: bad URL, scheme, redirects
"""

from __future__ import annotations

from conveyor.runtime.runner import StepError

__all__ = [
    "HttpConnectError",
    "HttpError",
    "HttpRequestError",
    "HttpStatusError",
    "HttpTimeout",
    "HttpTransportError",
]


class HttpError(StepError):
    pass


class HttpStatusError(HttpError):
    pass


class HttpConnectError(HttpError):
    retryable = True


class HttpTimeout(HttpError):
    retryable = True


class HttpTransportError(HttpError):
    retryable = True


class HttpRequestError(HttpError):
    pass
