"""Trace adapters: one module per source format, each with `detect(path)` and `load(path)`."""
