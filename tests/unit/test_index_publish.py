"""Publishing a version: the Redis key holds {version, path} and the same JSON goes out on the channel."""

from __future__ import annotations

import json
import time

import redis

from index.job import parse_args
from index.publish import INDEX_KEY, UPDATES_CHANNEL, index_key, publish_version, read_published, updates_channel


def test_names_are_stable():
    assert INDEX_KEY == "knnssd:index:current" and UPDATES_CHANNEL == "knnssd:index:updates"
    assert index_key("t:") == "t:knnssd:index:current" and updates_channel("t:") == "t:knnssd:index:updates"


def test_publish_sets_key_and_notifies(redis_url, redis_prefix, tmp_path):
    r = redis.Redis.from_url(redis_url)
    sub = r.pubsub()
    sub.subscribe(updates_channel(redis_prefix))
    try:
        assert sub.get_message(timeout=2)["type"] == "subscribe"
        assert read_published(redis_url, prefix=redis_prefix) is None
        payload = publish_version(redis_url, "20260101T000000-deadbeef", tmp_path / "v", prefix=redis_prefix)
        assert payload == {"version": "20260101T000000-deadbeef", "path": str((tmp_path / "v").resolve())}
        assert json.loads(r.get(index_key(redis_prefix))) == payload
        assert read_published(redis_url, prefix=redis_prefix) == payload
        msg = None
        deadline = time.monotonic() + 5
        while msg is None and time.monotonic() < deadline:
            msg = sub.get_message(timeout=1)
        assert msg is not None and json.loads(msg["data"]) == payload
    finally:
        sub.close()
        r.close()


def test_job_args():
    a = parse_args(["--data", "d", "--out", "o", "--budget", "3", "--redis-url", "redis://x:1/0"])
    assert (a.data, a.out, a.budget, a.redis_url, a.workers) == ("d", "o", 3, "redis://x:1/0", 2)
