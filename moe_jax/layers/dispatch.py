"""Dispatch / combine strategies: move tokens into expert buffers and expert outputs back.

Every backend consumes the same `RouterOutput` (buffer form) and gives the same result for the
same routing; they differ in cost:

  "einsum": GShard one-hot dispatch and combine tensors [G, S, E, C] (reference; O(G*S*E*C)).
  "gather": index the buffers directly (take / scatter-add; O(G*E*C*D), linear in tokens).

`dispatch` returns expert inputs x_EGCD; `combine` returns y_GSD. Empty slots contribute exactly
0, so a token that every chosen expert dropped gets exactly 0 (the residual carries it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.layers.routing import RouterOutput


def _dispatch_mask_GSEC(routing: RouterOutput, group_size: int):
  token_onehot_GECS = jax.nn.one_hot(routing.token_index_GEC, group_size, dtype=jnp.float32)
  return (token_onehot_GECS * routing.valid_GEC[..., None]).transpose(0, 3, 1, 2)


def einsum_dispatch(x_GSD, routing: RouterOutput):
  dispatch_GSEC = _dispatch_mask_GSEC(routing, x_GSD.shape[1]).astype(x_GSD.dtype)
  return jnp.einsum("GSEC,GSD->EGCD", dispatch_GSEC, x_GSD)


def einsum_combine(y_EGCD, routing: RouterOutput, group_size: int):
  dispatch_GSEC = _dispatch_mask_GSEC(routing, group_size)
  combine_GSEC = dispatch_GSEC * routing.combine_GEC[:, None, :, :]
  return jnp.einsum("GSEC,EGCD->GSD", combine_GSEC.astype(y_EGCD.dtype), y_EGCD)


def gather_dispatch(x_GSD, routing: RouterOutput):
  x_GECD = jax.vmap(lambda x_SD, idx_EC: x_SD[idx_EC])(x_GSD, routing.token_index_GEC)
  x_GECD = jnp.where(routing.valid_GEC[..., None], x_GECD, 0)
  return x_GECD.transpose(1, 0, 2, 3)


def gather_combine(y_EGCD, routing: RouterOutput, group_size: int):
  weighted_GECD = y_EGCD.transpose(1, 0, 2, 3) * routing.combine_GEC[..., None].astype(y_EGCD.dtype)

  # Empty slots point past the group and are dropped, so they never collide on token 0.
  index_GEC = jnp.where(routing.valid_GEC, routing.token_index_GEC, group_size)

  def scatter_add(y_ECD, idx_EC):
    y_SD = jnp.zeros((group_size, y_ECD.shape[-1]), y_ECD.dtype)
    return y_SD.at[idx_EC.reshape(-1)].add(y_ECD.reshape(-1, y_ECD.shape[-1]), mode="drop")

  return jax.vmap(scatter_add)(weighted_GECD, index_GEC)


# name -> (dispatch, combine)
BACKENDS = {
    "einsum": (einsum_dispatch, einsum_combine),
    "gather": (gather_dispatch, gather_combine),
}
