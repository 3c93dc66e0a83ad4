"""Publish a new index version to the serving side: one Redis key plus one pub/sub message.

The key `knnssd:index:current` holds `{"version": ..., "path": ...}` JSON (the state a router or replica
reads at start-up); the same JSON is PUBLISHed on `knnssd:index:updates` so running readers hot-reload.
Routers import the names from here. A `prefix` (tests) is prepended to both names.
"""

from __future__ import annotations

import json
from pathlib import Path

INDEX_KEY = "knnssd:index:current"
UPDATES_CHANNEL = "knnssd:index:updates"


def index_key(prefix: str = "") -> str:
    return prefix + INDEX_KEY


def updates_channel(prefix: str = "") -> str:
    return prefix + UPDATES_CHANNEL


def publish_version(redis_url: str, version: str, path: str | Path, prefix: str = "") -> dict:
    """SET the current-version key, then PUBLISH the same payload; returns the payload.

    `path` is the version directory (absolute, so readers on the same filesystem can load it).
    """
    import redis

    payload = {"version": version, "path": str(Path(path).resolve())}
    blob = json.dumps(payload, sort_keys=True)
    client = redis.Redis.from_url(redis_url)
    try:
        client.set(index_key(prefix), blob)
        client.publish(updates_channel(prefix), blob)
    finally:
        client.close()
    return payload


def read_published(redis_url: str, prefix: str = "") -> dict | None:
    """The payload last published ({version, path}), or None when nothing was published."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.get(index_key(prefix))
    finally:
        client.close()
    return json.loads(raw) if raw else None
