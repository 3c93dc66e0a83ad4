"""The Ray Serve config file of the service, rendered from `services.config.AppConfig`.

`render_serve_config()` is `deploy/serve_config.yaml` (for `serve run` / `serve deploy`; written by
`knnssd serve --write-serve-config`, a test checks it is up to date); `serve_config_yaml(app)` is the
same content without the header, which the KubeRay RayService carries as `serveConfigV2` (`deploy.k8s`).
"""

from __future__ import annotations

from pathlib import Path

import yaml

SERVE_CONFIG_PATH = Path(__file__).with_name("serve_config.yaml")
CANONICAL_REDIS_URL = "redis://127.0.0.1:6379/0"

_HEADER = """\
# Ray Serve config for the KNN-SSD service: `serve run deploy/serve_config.yaml` (local) or
# `serve deploy deploy/serve_config.yaml` (a running cluster); KubeRay takes the same content under
# `serveConfigV2`. Generated from services.config.AppConfig by `knnssd serve --write-serve-config`;
# do not edit by hand (a test checks it is up to date). It needs a Redis at `redis_url` and tenants
# added with `knnssd tenants add NAME`; `knnssd serve` does all of that by itself.
"""


def serve_config_yaml(app, width: int = 1000) -> str:
    """`app.serve_config()` (an AppConfig's Serve applications) as YAML."""
    return yaml.safe_dump(app.serve_config(), sort_keys=False, width=width)


def render_serve_config(config=None) -> str:
    """The Serve config file for `config` (default: AppConfig defaults with the standard local Redis URL)."""
    from services.config import AppConfig

    if config is None:
        config = AppConfig(redis_url=CANONICAL_REDIS_URL)
    return _HEADER + serve_config_yaml(config, width=120)
