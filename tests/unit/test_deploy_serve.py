"""The operator side of the Serve app (deploy/): the shipped Serve config file and `knnssd serve`'s dev tenant.
(Moved from test_service_deployments.py with the code, issue 14.)"""

from __future__ import annotations

import pytest

from services.config import AppConfig


def test_shipped_serve_config_is_up_to_date():
    from deploy.serve_config import SERVE_CONFIG_PATH, render_serve_config

    assert SERVE_CONFIG_PATH.read_text() == render_serve_config(), (
        "deploy/serve_config.yaml is stale: run `knnssd serve --write-serve-config`"
    )
    import yaml
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG_PATH.read_text()))
    app = schema.applications[0]
    assert app.import_path == "services.app:build_app"
    assert [d.name for d in app.deployments] == ["Gateway", "Router", "ModelReplica"]
    assert AppConfig.model_validate(app.args["config"]) == AppConfig(redis_url="redis://127.0.0.1:6379/0")


def test_dev_tenant_is_created_once_and_kept():
    from deploy.serve_cmd import ensure_dev_tenant

    class Store:
        def __init__(self):
            self.tenants = {}

        def authenticate(self, key):
            return next((t for t, k in self.tenants.values() if k == key), None)

        def get(self, name):
            return self.tenants.get(name, (None,))[0]

        def remove(self, name):
            return self.tenants.pop(name, None) is not None

        def add(self, name, key):
            from services.tenants import Tenant

            t, k = Tenant.create(name, key=key)
            self.tenants[name] = (t, k)
            return t, k

    s = Store()
    t1 = ensure_dev_tenant(s, "sk-1")
    assert ensure_dev_tenant(s, "sk-1") is t1
    t2 = ensure_dev_tenant(s, "sk-2")  # a new key replaces the old dev tenant
    assert t2.name == "dev" and s.authenticate("sk-1") is None
    s.add("other", "sk-3")
    with pytest.raises(ValueError):
        ensure_dev_tenant(s, "sk-3")
