"""moe_jax: sparse Mixture-of-Experts transformers in JAX/Flax (linen).

Shape glossary, used as suffixes of array names (`x_BLD`, `logits_GSE`, `w_EDF`) and as
einsum letters:

  B batch · L length · D d_model · N heads · H head dim · F ffn hidden · E experts ·
  C expert capacity · G groups · S group size (tokens per group) · K top-k · V vocab.

`moe_jax.layers` and `moe_jax.models` import only jax / flax / numpy / gin; TensorFlow and
seqio are imported only by `moe_jax.data`.
"""

__version__ = "0.1.0"
