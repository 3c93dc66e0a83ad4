"""Tenants without Redis: hashed keys, the tenants file, the static store."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.tenants import (
    Tenant,
    TenantStore,
    add_tenant_to_file,
    key_id,
    load_tenants_file,
    remove_tenant_from_file,
)


def test_key_is_only_stored_hashed():
    t, key = Tenant.create("acme", rpm=10)
    assert key.startswith("sk-knnssd-") and len(key) > 40
    dumped = t.model_dump_json()
    assert key not in dumped and key[10:30] not in dumped
    assert t.verify(key) and not t.verify(key + "x") and not t.verify("")
    t2, key2 = Tenant.create("acme2", key=key)
    assert t2.key_salt != t.key_salt and t2.key_hash != t.key_hash  # salted: same key, different hash
    assert t2.key_id == t.key_id == key_id(key)


def test_names_are_checked():
    for bad in ("", "has space", "a/b", "{x}", "x" * 65):
        with pytest.raises(ValidationError):
            Tenant.create(bad)


def test_file_round_trip(tmp_path):
    path = tmp_path / "tenants.yaml"
    assert load_tenants_file(path) == []
    a, ka = add_tenant_to_file(path, "a", rpm=5)
    b, kb = add_tenant_to_file(path, "b", index_version="v2")
    with pytest.raises(ValueError):
        add_tenant_to_file(path, "a")
    assert ka not in path.read_text() and kb not in path.read_text()
    assert (path.stat().st_mode & 0o777) == 0o600
    store = TenantStore(None, tenants=load_tenants_file(path))
    assert store.authenticate(ka).name == "a" and store.authenticate(kb).index_version == "v2"
    assert store.authenticate("sk-knnssd-nope") is None and store.authenticate("") is None
    assert remove_tenant_from_file(path, "a") and not remove_tenant_from_file(path, "a")
    assert [t.name for t in load_tenants_file(path)] == ["b"]
    assert [(t.name, src) for t, src in TenantStore(None, tenants=load_tenants_file(path)).list_tenants()] == [
        ("b", "file")
    ]
