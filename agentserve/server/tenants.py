"""Tenants: API keys, program ownership, prefix-cache isolation and per-tenant limits.

Configured by a file (`agentserve serve --tenants FILE`, JSON or YAML); without one the server is
open, as vLLM is. With one:

- every route but `/health` needs `Authorization: Bearer <key>` of a configured tenant (401 else);
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
import re
import secrets
from pathlib import Path

import msgspec

SEP = ":"  # tenant:program inside the server; tenant names cannot contain it
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


class Tenant(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    api_keys: list[str]
    max_programs: int = 1000  # live programs at once
    max_ttl_s: float | None = None  # longest pin this tenant's turns get (None: the server's bound)
    max_pinned_share: float | None = None  # share of the KV budget its pins may hold (None: the pin cap)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"tenant name {self.name!r}: 1-64 of letters, digits, '_', '.', '-'")
        if not self.api_keys or any(len(k) < 16 for k in self.api_keys):
            raise ValueError(f"tenant {self.name!r}: give api_keys, each at least 16 characters")
        if self.max_programs < 1:
            raise ValueError(f"tenant {self.name!r}: max_programs must be >= 1")
        if self.max_ttl_s is not None and self.max_ttl_s < 0:
            raise ValueError(f"tenant {self.name!r}: max_ttl_s must be >= 0")
        if self.max_pinned_share is not None and not 0 <= self.max_pinned_share <= 1:
            raise ValueError(f"tenant {self.name!r}: max_pinned_share must be in [0, 1]")


class TenantsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    tenants: list[Tenant]
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self) -> None:
        names = [t.name for t in self.tenants]
        keys = [k for t in self.tenants for k in t.api_keys]
        if not names or len(set(names)) != len(names) or len(set(keys)) != len(keys):
            raise ValueError("tenants: at least one, names and api keys unique")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be >= 1024")

    @classmethod
    def load(cls, path: str | Path) -> "TenantsConfig":
        text = Path(path).read_bytes()
        try:
            if str(path).endswith((".yaml", ".yml")):
                import yaml

                return msgspec.convert(yaml.safe_load(text), cls)
            return msgspec.json.decode(text, type=cls)
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def pin_shares(self) -> dict[str, float]:
        """tenant -> share of the KV budget its pins may hold, for the scheduler plugin."""
        return {t.name: t.max_pinned_share for t in self.tenants if t.max_pinned_share is not None}


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

    def authenticate(self, authorization: str | None) -> Tenant | None:
        if not authorization or not authorization.startswith("Bearer "):
            return None
        return self._by_key.get(self._digest(authorization.removeprefix("Bearer ").strip()))

    def cache_salt(self, tenant: Tenant, client_salt: str | None = None) -> str:
        salt = hmac.new(self._secret, tenant.name.encode(), hashlib.sha256).hexdigest()
        return salt if not client_salt else f"{salt}{SEP}{client_salt}"

    @staticmethod
    def scope(tenant: Tenant, program_id: str) -> str:
        return f"{tenant.name}{SEP}{program_id}"


def tenant_of(program_id: str) -> str | None:
    """The tenant of a scoped program id (None: the server runs without tenants)."""
    name, sep, _ = program_id.partition(SEP)
    return name if sep else None


def admit_under_limits(control):
    """`admit(tenant, program_id)` for the middleware: a known program always, a new one while its
    tenant has fewer live programs than its limit (a count over live programs: O(programs))."""

    def admit(tenant: Tenant, program_id: str) -> bool:
        if program_id in control.tracker.programs:
            return True
        return control.live_programs(lambda p: tenant_of(p) == tenant.name) < tenant.max_programs

    return admit


def ttl_caps(gate: TenantGate):
    """program -> its tenant's longest TTL (None: no tenant limit)."""

    def cap(program_id: str) -> float | None:
        tenant = gate.tenants.get(tenant_of(program_id) or "")
        return tenant.max_ttl_s if tenant is not None else None

    return cap
