"""Flax linen building blocks: routers, dispatch, experts, the MoE layer, T5 layers."""
