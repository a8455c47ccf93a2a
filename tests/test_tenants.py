"""Tenants without an engine: keys, scoping, cache salts, limits, the body and path rewriting."""

from __future__ import annotations

import json

import msgspec
import pytest

from agentserve.options import TenantsConfig
from agentserve.programs.fields import XARG_PARENT, XARG_PROGRAM
from agentserve.programs.ids import tenant_of
from agentserve.server.middleware import _scoped_program_path, rewrite
from agentserve.server.tenants import TenantGate

KEY_A, KEY_B = "sk-acme-0123456789abcdef", "sk-bolt-0123456789abcdef"
CONFIG = msgspec.convert({"tenants": [
        {"name": "acme", "api_keys": [KEY_A], "max_programs": 2, "max_ttl_s": 5.0, "max_pinned_share": 0.25},
        {"name": "bolt", "api_keys": [KEY_B]}]}, TenantsConfig)


def test_keys_authenticate_their_tenant_only():
    gate = TenantGate(CONFIG)
    assert gate.authenticate(f"Bearer {KEY_A}").name == "acme"
    assert gate.authenticate(f"Bearer {KEY_B}").name == "bolt"
    for bad in (None, "", KEY_A, f"Bearer {KEY_A[:-1]}", "Bearer ", f"Basic {KEY_A}"):
        assert gate.authenticate(bad) is None


def test_cache_salts_differ_by_tenant_and_server_secret():
    gate = TenantGate(CONFIG, secret=b"s" * 32)
    acme, bolt = gate.tenants["acme"], gate.tenants["bolt"]
    assert gate.cache_salt(acme) != gate.cache_salt(bolt)
    assert gate.cache_salt(acme) == TenantGate(CONFIG, secret=b"s" * 32).cache_salt(acme)
    assert gate.cache_salt(acme) != TenantGate(CONFIG).cache_salt(acme)  # a fresh secret per server
    assert "acme" not in gate.cache_salt(acme) and gate.cache_salt(acme, "mine").endswith(":mine")


@pytest.mark.parametrize("bad, match", [
    ({"tenants": []}, "at least one"),
    ({"tenants": [{"name": "a b", "api_keys": [KEY_A]}]}, "tenant name"),
    ({"tenants": [{"name": "a", "api_keys": ["short"]}]}, "16 characters"),
    ({"tenants": [{"name": "a", "api_keys": [KEY_A]}, {"name": "b", "api_keys": [KEY_A]}]}, "unique"),
    ({"tenants": [{"name": "a", "api_keys": [KEY_A], "max_pinned_share": 2}]}, "max_pinned_share"),
    ({"tenants": [{"name": "a", "api_keys": [KEY_A], "colour": 1}]}, "colour"),
])
def test_bad_tenant_files_are_refused_with_the_reason(tmp_path, bad, match):
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=match):
        TenantsConfig.load(path)


def test_yaml_tenant_file(tmp_path):
    path = tmp_path / "tenants.yaml"
    path.write_text(f"tenants:\n  - name: acme\n    api_keys: [{KEY_A}]\n    max_pinned_share: 0.2\n")
    assert TenantsConfig.load(path).pin_shares() == {"acme": 0.2}


def body(**kw) -> bytes:
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], **kw}).encode()


def test_request_bodies_are_scoped_salted_and_limited():
    gate = TenantGate(CONFIG)
    acme = gate.tenants["acme"]
    out, _, error = rewrite(body(agentserve={"program_id": "p", "parent_program_id": "root"}), tenant=acme, gate=gate)
    data = json.loads(out)
    assert error is None and data["vllm_xargs"][XARG_PROGRAM] == "acme:p" and tenant_of("acme:p") == "acme"
    assert data["vllm_xargs"][XARG_PARENT] == "acme:root"
    assert data["cache_salt"] == gate.cache_salt(acme)
    plain, _, error = rewrite(body(), tenant=acme, gate=gate)  # no program: still salted
    assert error is None and json.loads(plain)["cache_salt"] == gate.cache_salt(acme)
    _, _, error = rewrite(body(vllm_xargs={"agentserve_program_id": "bolt:p"}), tenant=acme, gate=gate)
    assert error.status_code == 400 and b"reserved" in error.body
    _, _, error = rewrite(body(cache_salt=7), tenant=acme, gate=gate)
    assert error.status_code == 400
    _, _, error = rewrite(body(agentserve={"program_id": "new"}), tenant=acme, gate=gate, admit=lambda t, p: False)
    assert error.status_code == 429 and b"acme" in error.body
    untouched = body()
    assert rewrite(untouched) == (untouched, [], None)  # no tenants, no program: as stock vLLM


def test_program_route_paths_are_scoped():
    acme = TenantGate(CONFIG).tenants["acme"]
    scope = {"path": "/v1/programs/p%2F1/tool", "raw_path": b"/v1/programs/p%2F1/tool"}
    scoped = _scoped_program_path(scope, acme)
    assert scoped["path"] == "/v1/programs/acme:p/1/tool" and scoped["raw_path"] == b"/v1/programs/acme:p%2F1/tool"
    assert _scoped_program_path({"path": "/v1/models"}, acme) == {"path": "/v1/models"}
