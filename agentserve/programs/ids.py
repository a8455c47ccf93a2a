"""Program ids: with tenants configured, the server scopes a client's program id by its tenant
(`acme:prog-1`), so ids never collide across tenants and a tenant reaches only its own programs."""

from __future__ import annotations

SEP = ":"  # tenant:program inside the server; tenant names cannot contain it


def scope_id(tenant: str, program_id: str) -> str:
    return f"{tenant}{SEP}{program_id}"


def tenant_of(program_id: str) -> str | None:
    """The tenant of a scoped program id (None: the server runs without tenants)."""
    name, sep, _ = program_id.partition(SEP)
    return name if sep else None
