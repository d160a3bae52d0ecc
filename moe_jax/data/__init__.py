"""Data pipeline: seqio tasks, vocabularies, span corruption, packed and sharded batches.

Importing this package (or `moe_jax.data.tasks`) registers the tasks. TensorFlow and seqio are
imported here and nowhere in `moe_jax.layers` / `moe_jax.models`.

    from moe_jax import data
    ds = data.get_dataset("tiny_shakespeare_span_corruption", {"inputs": 512, "targets": 114},
                          split="train", batch_size=8, shuffle=True, seed=0)
"""

from moe_jax.data.metrics import bleu
from moe_jax.data.pipeline import (EncDecFeatureConverter, LMFeatureConverter, get_dataset,
                                   get_feature_converter)
from moe_jax.data.span_corruption import span_corruption_lengths
from moe_jax.data.tasks import TASK_NAMES, register_tasks, registered_task_names
from moe_jax.data.vocabularies import (VOCABULARY_PATH_MACRO, ConfiguredVocabulary,
                                        configured_vocabulary, get_vocabulary)
