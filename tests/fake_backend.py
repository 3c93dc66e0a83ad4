"""A fake model backend for gateway tests: it serves one model and records the requests it is asked."""

from __future__ import annotations

from services.backend import BackendRequest

MODEL = "smollm2"


class RecordingBackend:
    """Serves `MODEL`; a subclass's `stream` appends each request to `requests` and yields its chunks."""

    def __init__(self) -> None:
        self.requests: list[BackendRequest] = []

    def models(self) -> list[str]:
        return [MODEL]
