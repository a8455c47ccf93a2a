"""Tenants: API keys, program ownership, prefix-cache isolation and per-tenant limits.

Configured by a file (`agentserve serve --tenants FILE`, JSON or YAML); without one the server is
open, as vLLM is. With one:

- every route but `/health` needs the API key of a configured tenant, as `Authorization: Bearer <key>`
  (OpenAI clients) or `x-api-key: <key>` (Anthropic clients) (401 else), and a tenant may use only
  the routes server/routes.py lists (403 else: deny by default);
- program ids are scoped by tenant (`acme:prog-1` inside the server): a tenant's tool events, ends
  and reads reach only its own programs, another tenant's id is simply unknown (404), and ids never
  collide across tenants;
- every LLM request gets a per-tenant `cache_salt` (vLLM mixes it into the prefix-cache block
  hashes): a tenant's cached prefix never serves another tenant, so cache-hit timing reveals nothing
  across tenants. The salt is an HMAC of the tenant name under a per-server secret, so it cannot be
  guessed from the name; a client's own salt is kept, appended;
- `agentserve_*` keys in a client's `vllm_xargs` are refused: they would bypass the scoping;
- limits: live programs per tenant (429), longest TTL a tenant's pins get, share of the KV budget its
  pins may hold (enforced in the scheduler plugin's pin table), request body size (413).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from agentserve.options import Tenant, TenantsConfig
from agentserve.programs.ids import SEP, scope_id, tenant_of


class TenantGate:
    """Authentication and scoping; plain Python (the HTTP middleware calls it)."""

    def __init__(self, config: TenantsConfig, secret: bytes | None = None):
        self.config = config
        self._secret = secret or secrets.token_bytes(32)
        # keys are compared by their digest: a dict lookup whose time does not depend on how much
        # of a guessed key is right
        self._by_key = {self._digest(k): t for t in config.tenants for k in t.api_keys}
        self.tenants = {t.name: t for t in config.tenants}

    @staticmethod
    def _digest(key: str) -> bytes:
        return hashlib.sha256(key.encode()).digest()

    def authenticate(self, authorization: str | None, api_key: str | None = None) -> Tenant | None:
        """The tenant of a request's key (`Authorization: Bearer KEY` and/or `x-api-key: KEY`), or None:
        no key, an unknown key, or two keys that name different tenants."""
        keys = []
        if authorization is not None:
            if not authorization.startswith("Bearer "):
                return None
            keys.append(authorization.removeprefix("Bearer ").strip())
        if api_key is not None:
            keys.append(api_key.strip())
        tenants = {id(t): t for t in (self._by_key.get(self._digest(k)) for k in keys)}
        if not keys or None in tenants.values() or len(tenants) != 1:
            return None
        return next(iter(tenants.values()))

    def cache_salt(self, tenant: Tenant, client_salt: str | None = None) -> str:
        salt = hmac.new(self._secret, tenant.name.encode(), hashlib.sha256).hexdigest()
        return salt if not client_salt else f"{salt}{SEP}{client_salt}"

    @staticmethod
    def scope(tenant: Tenant, program_id: str) -> str:
        return scope_id(tenant.name, program_id)


def under_limit(control, tenant: str, max_programs: int, program_id: str) -> bool:
    """A known program always; a new one while its tenant has fewer live programs than its limit (a
    count over live programs: O(programs))."""
    if control.knows(program_id):
        return True
    return control.live_programs(lambda p: tenant_of(p) == tenant) < max_programs


def admit_under_limits(control):
    """`admit(tenant, program_id)` for the middleware, over this process's control plane."""

    def admit(tenant: Tenant, program_id: str) -> bool:
        return under_limit(control, tenant.name, tenant.max_programs, program_id)

    return admit


def ttl_caps(gate: TenantGate):
    """program -> its tenant's longest TTL (None: no tenant limit)."""

    def cap(program_id: str) -> float | None:
        tenant = gate.tenants.get(tenant_of(program_id) or "")
        return tenant.max_ttl_s if tenant is not None else None

    return cap
