"""How a media step fails, as data the scheduler can act on.

The tree, rooted in the harness's ``StepError`` (``conveyor.runtime.runner``)::

    StepError
    ├── (harness) TemplateError, MissingSecret, ConfigError, UnknownStepKind, StepTimeout
    └── MediaError              ffmpeg cannot read the input (corrupt, not media, no
        │                       stream of the kind needed) or cannot make the output
        ├── PathOutsideRoot     the source resolves outside the media root (never retried)
        ├── InvalidMediaSource  not a source the runner accepts (a malformed artifact uri,
        │                       an unknown scheme, a NUL byte, a name starting with '-')
        ├── MediaNotFound       no regular file at the source, no such artifact
        ├── DownloadRefused     a URL the runner will not fetch: a private address (unless
        │                       allowed), a redirect to a scheme other than http(s)
        ├── DownloadTooLarge    the download is larger than CONVEYOR_MEDIA_MAX_DOWNLOAD_BYTES
        ├── DownloadFailed      the server said no (4xx) or could not be reached; retryable
        │                       for 5xx, 408, 429, timeouts and connection errors
        ├── ArtifactStoreError  the artifact store could not be read or written (retryable)
        ├── MediaTimeout        ffmpeg/ffprobe overran its limit and was killed (retryable)
        └── MediaToolError      ffmpeg/ffprobe cannot be run here (retryable: another
                                runner of the group may have it)
"""

from __future__ import annotations

from conveyor.runtime.runner import StepError

__all__ = [
    "ArtifactStoreError",
    "DownloadFailed",
    "DownloadRefused",
    "DownloadTooLarge",
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


class DownloadRefused(MediaError):
    pass


class DownloadTooLarge(MediaError):
    pass


class DownloadFailed(MediaError):
    pass


class ArtifactStoreError(MediaError):
    retryable = True
