"""The Ray that `knnssd serve` starts on one machine: reachable from this machine only, with token auth.

`local_ray_env()` is the environment set before Ray is imported (every Ray process inherits it) and
`LOCAL_INIT` the extra `ray.init` arguments. Together they put Ray in its single-machine mode: the node
address is 127.0.0.1, so GCS, raylets, workers, the dashboard agent (with its job API) and the runtime-env
agent listen on loopback only, and every Ray RPC and the agent's HTTP API need a token made fresh per run
(kept in our processes' environment, never on disk). Only the Serve HTTP proxy listens where `--host` says.

One Ray server ignores the node address: each Serve replica opens its inter-deployment gRPC server on
"[::]:0" (every interface). `bind_loopback` is a worker setup hook that moves it to 127.0.0.1.
"""

from __future__ import annotations

import secrets
from typing import Any

HOOK = "deploy.ray_local.bind_loopback"

# ray.init arguments besides the address
LOCAL_INIT: dict[str, Any] = {"_node_ip_address": "127.0.0.1", "dashboard_host": "127.0.0.1", "include_dashboard": False}


def local_ray_env() -> dict[str, str]:
    from services.errors import PROXY_CALLBACK, PROXY_CALLBACK_ENV

    return {
        # Ray's single-machine mode (made for laptops): the node address becomes 127.0.0.1 instead of the
        # machine's external one, and Ray's servers bind the node address.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        # The Serve proxy's own errors (bad HTTP, back-pressure) in the OpenAI envelope.
        PROXY_CALLBACK_ENV: PROXY_CALLBACK,
    }


def bind_loopback() -> None:
    """Worker setup hook (`runtime_env={"worker_process_setup_hook": HOOK}`): Serve replicas bind their
    inter-deployment gRPC server to 127.0.0.1 instead of "[::]" (Ray has no setting for it)."""
    try:
        from ray.serve._private import replica
    except ImportError:  # pragma: no cover - a worker without Serve
        return
    original = replica.add_port_to_grpc_server
    if getattr(original, "_knnssd_loopback", False):
        return

    def add_port(server: Any, address: str) -> int:
        if address.startswith("[::]:") or address.startswith("0.0.0.0:"):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    add_port._knnssd_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port
