"""The media runner: a stateless consumer group serving the ffmpeg steps (``media.*``)."""

from conveyor.media.main import MediaService, create_app, create_service, main

__all__ = ["MediaService", "create_app", "create_service", "main"]
