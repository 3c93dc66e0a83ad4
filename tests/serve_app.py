"""Shared teardown of the tests that start a real Ray Serve app."""

from __future__ import annotations


def stop_serve_app(client, prefix: str) -> None:
    """Shut Serve and Ray down, then delete the Redis keys under the test's prefix and close the client
    (the keys go even when a shutdown fails)."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
        keys = list(client.scan_iter(match=prefix[: -len("knnssd:")] + "*"))
        if keys:
            client.delete(*keys)
        client.close()
