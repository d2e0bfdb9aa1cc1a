"""Interoperability: official JAX checkpoints, timm, and one filter for foreign state dicts."""
