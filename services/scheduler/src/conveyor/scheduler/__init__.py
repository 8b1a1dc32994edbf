"""The scheduler: turns triggers into runs and step results into the next steps."""

__all__: list[str] = []
