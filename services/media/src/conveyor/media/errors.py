"""How a media step fails, as data the scheduler can act on.

The tree, rooted in the harness's ``StepError`` (``conveyor.runtime.runner``)::

    StepError
    ├── (harness) TemplateError, MissingSecret, ConfigError, UnknownStepKind, StepTimeout
    └── MediaError              ffmpeg cannot read the input: corrupt, or not media at all
        ├── PathOutsideRoot     the source resolves outside the media root (never retried)
        ├── InvalidMediaSource  not a path or file:// uri the runner accepts
        ├── MediaNotFound       no regular file at the source
        ├── MediaTimeout        the probe overran; its process was killed (retryable)
        └── MediaToolError      ffmpeg/ffprobe cannot be run here (retryable: another
                                runner of the group may have it)
"""

from __future__ import annotations

from conveyor.runtime.runner import StepError

__all__ = [
    "InvalidMediaSource",
    "MediaError",
    "MediaNotFound",
    "MediaTimeout",
    "MediaToolError",
    "PathOutsideRoot",
]


class MediaError(StepError):
    pass


class PathOutsideRoot(MediaError):
    pass


class InvalidMediaSource(MediaError):
    pass


class MediaNotFound(MediaError):
    pass


class MediaTimeout(MediaError):
    retryable = True


class MediaToolError(MediaError):
    retryable = True
