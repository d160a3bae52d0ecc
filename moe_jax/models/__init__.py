"""Assembled networks built from `moe_jax.layers`."""
