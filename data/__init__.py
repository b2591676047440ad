"""Seeded synthetic token data with exact optimal next-token losses.

Pure NumPy at import time (TensorFlow is imported lazily inside
`data.tfrecord` functions only).

    from data import DataSpec, generate, optimal_loss
    spec = DataSpec("markov", vocab_size=256, seq_len=128, seed=0, order=1)
    tokens = generate(spec, num_sequences=1000)           # int32 [1000, 128]
    optimal_loss(spec)                                    # nats / target token
"""

from .generators import (
    BLOCK_SIZE,
    GENERATOR_VERSION,
    describe,
    generate,
    generate_block,
    iter_generate,
    shard_ranges,
)
from .losses import (
    bayes_token_losses,
    empirical_bayes_loss,
    optimal_loss,
    optimal_loss_bounds,
    optimal_loss_is_exact,
    per_position_optimal_loss,
    token_log_probs,
)
from .models import markov_transition_matrix, mixture_weights, unigram_probs
from .spec import KINDS, DataSpec, DataSpecError
from .tfrecord import make_dataset, sequence_to_example, serialize_sequences, write_tfrecords

__all__ = [
    "BLOCK_SIZE",
    "GENERATOR_VERSION",
    "KINDS",
    "DataSpec",
    "DataSpecError",
    "bayes_token_losses",
    "describe",
    "empirical_bayes_loss",
    "generate",
    "generate_block",
    "iter_generate",
    "make_dataset",
    "markov_transition_matrix",
    "mixture_weights",
    "optimal_loss",
    "optimal_loss_bounds",
    "optimal_loss_is_exact",
    "per_position_optimal_loss",
    "sequence_to_example",
    "serialize_sequences",
    "shard_ranges",
    "token_log_probs",
    "unigram_probs",
    "write_tfrecords",
]
