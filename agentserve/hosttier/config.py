"""The engine configuration of the host tier: vLLM's offloading connector with agentserve's spec and
cache policy, sized exactly in tokens, and composed with the KV-sharing connector when both are on."""

from __future__ import annotations

import mmap

from agentserve.options import HostTierOptions

SPEC = ("HostTierSpec", "agentserve.hosttier.spec")
POLICIES = {"next-use": ("NextUseCachePolicy", "agentserve.hosttier.policy"), "lru": ("lru", None)}


def host_bytes(tokens: int, block_size: int, kv_bytes_per_token: int) -> int:
    """Bytes that hold `tokens` of KV in vLLM's host pool: whole blocks, each padded to the page size
    the spec aligns chunks to."""
    blocks = -(-tokens // block_size)
    block_bytes = block_size * kv_bytes_per_token
    return blocks * (-(-block_bytes // mmap.PAGESIZE) * mmap.PAGESIZE)


def offloading_config(o: HostTierOptions, *, block_size: int, kv_bytes_per_token: int, programs: bool) -> dict:
    """The `kv_transfer_config` of the tier. `programs`: the scheduler plugin runs (else the next-use
    policy has no programs to order by, and vLLM's LRU is used)."""
    if o.kv_tokens < block_size:
        raise ValueError(f"--host-kv-tokens {o.kv_tokens} is smaller than one KV block ({block_size} tokens)")
    name, module = POLICIES[o.policy if programs else "lru"]
    extra = {"spec_name": SPEC[0], "spec_module_path": SPEC[1], "eviction_policy": name,
             "cpu_bytes_to_use": host_bytes(o.kv_tokens, block_size, kv_bytes_per_token),
             "copy_throttle": o.copy_throttle, "verify": o.verify}
    if module is not None:
        extra["cache_policy_module_path"] = module
    return {"kv_connector": "OffloadingConnector", "kv_role": "kv_both", "kv_connector_extra_config": extra}


def combined(*configs: dict | None) -> dict | None:
    """One connector config for several (vLLM's MultiConnector), in order; None if there is none."""
    present = [c for c in configs if c]
    if len(present) <= 1:
        return present[0] if present else None
    combined = {"kv_connector": "MultiConnector", "kv_role": "kv_both",
                "kv_connector_extra_config": {"connectors": present}}
    # vLLM reads the failure policy from the top-level config only
    if any(c.get("kv_load_failure_policy") == "recompute" for c in present):
        combined["kv_load_failure_policy"] = "recompute"
    return combined
