"""Which HTTP routes reach the engine with a prompt, and which a tenant may use.

vLLM's app serves far more than chat and completions (Anthropic messages, responses, batches,
pooling, scoring, SageMaker, elastic scaling, dev and RL routes), and every vLLM release adds some.
With tenants the rule is deny by default: a tenant may use a route only if it is listed here, either
as an engine route (its body gets the tenant's cache salt and program scoping; vLLM 0.32's protocols
of these routes accept `cache_salt`, and all but the batch `vllm_xargs`) or as a route that reads no
cached prefix and no other tenant's state. Any other route is refused (403) before vLLM sees it, so
a route that a later vLLM adds is closed until it is listed.
"""

from __future__ import annotations

# Routes whose requests run the model on a prompt: salted, program-scoped, size-limited.
ENGINE_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses",
                           "/v1/chat/completions/batch"})
# Engine routes a request of which is not one program's call (a batch is many conversations).
NO_PROGRAM_ROUTES = frozenset({"/v1/chat/completions/batch"})
PUBLIC = frozenset({("GET", "/health")})  # answered without an API key
# What else a tenant may use: listings, its own programs (scoped by the middleware), tokenizers.
TENANT_ROUTES = frozenset({
    ("GET", "/v1/models"), ("GET", "/version"), ("GET", "/metrics"), ("GET", "/v1/agentserve/stats"),
    ("GET", "/v1/kvshare/stats"), ("POST", "/tokenize"), ("POST", "/detokenize"),
    ("POST", "/v1/messages/count_tokens")})
TENANT_PREFIXES = (("GET", "/v1/models/"), ("GET", "/v1/programs/"), ("POST", "/v1/programs/"))


def is_public(method: str, path: str) -> bool:
    return (method, path) in PUBLIC


def is_engine_route(method: str, path: str) -> bool:
    return method == "POST" and path in ENGINE_ROUTES


def tenant_may_use(method: str, path: str) -> bool:
    """Whether an authenticated tenant may use this route (deny by default)."""
    return (is_engine_route(method, path) or is_public(method, path) or (method, path) in TENANT_ROUTES
            or any(method == m and path.startswith(p) and len(path) > len(p) for m, p in TENANT_PREFIXES))
