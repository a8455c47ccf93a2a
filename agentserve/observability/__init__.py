"""Observability: OpenTelemetry traces of programs (metrics live in agentserve/server/metrics.py)."""
