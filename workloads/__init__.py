"""Trace adapters (SWE-bench, BFCL, ...) into a neutral schema, and the replay driver: not built yet."""
