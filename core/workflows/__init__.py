"""Workflows over the parts: training a model from a config (train), the end-to-end demo.

Internal layout; the public API is :mod:`atomforge` itself."""
