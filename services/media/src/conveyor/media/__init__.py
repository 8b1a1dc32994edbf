"""The media runner: a stateless consumer group serving ffmpeg steps (``media.probe``)."""

from conveyor.media.main import MediaService, create_app, create_service, main

__all__ = ["MediaService", "create_app", "create_service", "main"]
