"""Autoregressive generation with the KV cache (absorbed MLA by default).

Prompts of different lengths are left-padded; every sequence's RoPE positions
start at 0 at its first real token, and padded cache slots are masked out, so
a prompt generates the same tokens alone or in a batch.

Two paths produce the same greedy tokens:

* compiled (the default): one function per (batch, prompt-length bucket,
  max_new_tokens, cache mode, cache dtype), compiled once and reused, that
  prefills the prompt and runs the whole decode loop on the device
  (`keras.ops.while_loop`: `jax.lax.while_loop` inside one `jax.jit`, or
  `tf.while_loop` inside one `tf.function`). Sampling happens in the loop,
  drawn from the backend's counter-based RNG seeded by (seed, step).
* eager (`compiled=False`): the same steps op by op, sampling on the host in
  NumPy. Kept as the reference the compiled path is tested against.

Every request is validated first (`validate_request`); a bad one raises
`GenerationRequestError` (a ValueError) naming the problem.
"""

from __future__ import annotations

import math
import numbers
import weakref
from typing import List, Optional, Sequence, Tuple

import numpy as np

# Prompts are left-padded to a multiple of this, so prompts of nearby lengths
# share one compiled function.
PROMPT_BUCKET = 16


class GenerationRequestError(ValueError):
    """A generation request the model cannot serve; the message says why."""


def _fail(message: str) -> None:
    raise GenerationRequestError(f"generate: {message}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# ------------------------------------------------------------- validation
def validate_request(config, prompts, max_new_tokens, temperature=0.0, top_k=None,
                     top_p=None, eos_id=None, seed=0) -> List[List[int]]:
    """Checks a request against the model's config; returns the prompts as
    lists of Python ints. Raises GenerationRequestError naming the problem."""
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__") or len(prompts) == 0:
        _fail("prompts must be a non-empty list of token-id lists")
    clean = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__len__"):
            _fail(f"prompt {i} must be a list of token ids, got {type(prompt).__name__}")
        if len(prompt) == 0:
            _fail(f"prompt {i} is empty; every prompt needs at least one token")
        row = []
        for token in (prompt.tolist() if isinstance(prompt, np.ndarray) else prompt):
            if not _is_int(token):
                _fail(f"prompt {i} holds {token!r}, which is not an integer token id")
            if not 0 <= token < config.vocab_size:
                _fail(f"prompt {i} has token id {token} outside the vocabulary "
                      f"[0, {config.vocab_size})")
            row.append(int(token))
        clean.append(row)
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        _fail(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    longest = max(len(p) for p in clean)
    if longest + max_new_tokens > config.max_position_embeddings:
        _fail(f"prompt length {longest} + max_new_tokens {max_new_tokens} = "
              f"{longest + max_new_tokens} exceeds max_position_embeddings="
              f"{config.max_position_embeddings}")
    if (not isinstance(temperature, numbers.Real) or isinstance(temperature, bool)
            or not math.isfinite(temperature) or temperature < 0):
        _fail(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        _fail(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, numbers.Real) or isinstance(top_p, bool)
                              or not 0 < top_p <= 1):
        _fail(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    if eos_id is not None and (not _is_int(eos_id) or not 0 <= eos_id < config.vocab_size):
        _fail(f"eos_id must be a token id in [0, {config.vocab_size}) or None, got {eos_id!r}")
    if not _is_int(seed):
        _fail(f"seed must be an integer, got {seed!r}")
    return clean


# ---------------------------------------------------------------- padding
def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, width: Optional[int] = None):
    """-> (token_ids [B, W] int32, padding_mask [B, W] int32); W = the longest
    prompt, or `width` when given (more left padding)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        _fail("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    width = longest if width is None else max(width, longest)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(prompts), width), dtype=np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def prompt_bucket(longest: int, max_new_tokens: int, max_positions: int) -> int:
    """The padded prompt width: the next multiple of PROMPT_BUCKET (the cache
    never needs more slots than max_position_embeddings)."""
    bucket = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    return max(longest, min(bucket, max_positions - max_new_tokens))


# ---------------------------------------------------------- host sampling
def sample_next(logits: np.ndarray, rng: np.random.Generator, temperature: float = 0.0,
                top_k: Optional[int] = None, top_p: Optional[float] = None) -> np.ndarray:
    """logits [B, V] -> token ids [B]. temperature 0 is greedy."""
    logits = np.asarray(logits, dtype=np.float64)
    if temperature <= 0:
        return logits.argmax(-1).astype(np.int32)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = np.sort(logits, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if top_p is not None and 0 < top_p < 1:
        order = np.argsort(-probs, axis=-1)
        sorted_p = np.take_along_axis(probs, order, -1)
        # Keep the smallest prefix whose mass reaches top_p (always >= 1 token).
        keep_sorted = (np.cumsum(sorted_p, -1) - sorted_p) < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(-1, keepdims=True)
    cumulative = probs.cumsum(-1)
    draws = rng.random((probs.shape[0], 1))
    return np.minimum((cumulative < draws).sum(-1), probs.shape[-1] - 1).astype(np.int32)


# -------------------------------------------------------- device sampling
def _uniform(shape, seed, step):
    """Uniform (0, 1) draws from the backend's stateless RNG, keyed by (seed, step)."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
        return jax.random.uniform(key, shape, minval=1e-20, maxval=1.0)
    if backend == "tensorflow":
        import tensorflow as tf

        pair = tf.stack([tf.cast(seed, tf.int32), tf.cast(step, tf.int32)])
        return tf.random.stateless_uniform(shape, seed=pair, minval=1e-20, maxval=1.0)
    raise NotImplementedError(f"compiled sampling has no RNG for backend {backend!r}")


def filter_logits(scaled, top_k, top_p):
    """Masks (to -inf) every logit outside the top_k (0 = all) and outside the
    smallest top-probability set whose mass reaches top_p (always >= 1 token)."""
    from keras import ops

    vocab = ops.shape(scaled)[-1]
    sorted_desc = ops.flip(ops.sort(scaled, axis=-1), axis=-1)
    top_k = ops.cast(top_k, "int32")
    k = ops.where(ops.logical_and(top_k > 0, top_k < vocab), top_k, vocab)
    rank = ops.arange(vocab, dtype="int32")[None, :]
    sorted_desc = ops.where(rank < k, sorted_desc, float("-inf"))
    probs = ops.softmax(sorted_desc, axis=-1)
    mass_before = ops.cumsum(probs, axis=-1) - probs
    keep = ops.logical_and(rank < k, mass_before < ops.cast(top_p, "float32"))
    kept = ops.maximum(ops.sum(ops.cast(keep, "int32"), axis=-1), 1)
    threshold = ops.take_along_axis(sorted_desc, (kept - 1)[:, None], axis=-1)
    return ops.where(scaled < threshold, float("-inf"), scaled)


def sample_on_device(logits, temperature, top_k, top_p, seed, step):
    """logits [B, V] -> token ids [B] int32, in the compiled graph: argmax when
    temperature <= 0, else a Gumbel-max draw from the filtered distribution."""
    from keras import ops

    logits = ops.cast(logits, "float32")
    temperature = ops.cast(temperature, "float32")

    def greedy():
        return ops.cast(ops.argmax(logits, axis=-1), "int32")

    def draw():
        scaled = logits / ops.maximum(temperature, 1e-6)
        filtered = filter_logits(scaled, top_k, top_p)
        gumbel = -ops.log(-ops.log(_uniform(ops.shape(logits), seed, step)))
        return ops.cast(ops.argmax(filtered + gumbel, axis=-1), "int32")

    return ops.cond(temperature > 0, draw, greedy)


# ------------------------------------------------------ the compiled loop
def decode_loop(model, token_ids, padding_mask, max_new_tokens, temperature, top_k, top_p,
                eos_id, seed, mode=None, cache_dtype="float32", pad_id=0):
    """Prefill + decode loop, in backend ops (traced once by a jit/tf.function).

    token_ids, padding_mask [B, P] int32 (left-padded); max_new_tokens a
    Python int (static shapes, JAX) or a scalar tensor (the SavedModel);
    eos_id < 0 disables EOS. Returns (tokens [B, max_new_tokens] int32, pad_id
    after a sequence's EOS; lengths [B] int32, the tokens up to and including
    EOS). The loop stops early once every sequence has stopped."""
    from keras import ops

    from .deepseek_v3 import positions_from_padding

    batch, width = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
    max_new = max_new_tokens
    # The token buffer has >= 1 slot so the first (prefill) token always has a
    # place; it is cut back to max_new_tokens at the end.
    slots = max(max_new, 1) if isinstance(max_new, int) else ops.maximum(max_new, 1)
    total = width + max_new
    eos_id = ops.cast(eos_id, "int32")

    caches = model.init_caches(batch, total, mode=mode, dtype=cache_dtype)
    key_mask = ops.concatenate(
        [ops.cast(padding_mask, "int32"), ops.zeros((batch, max_new), "int32")], axis=1)
    positions = positions_from_padding(padding_mask)
    lengths = ops.sum(ops.cast(padding_mask, "int32"), axis=1)
    logits, caches = model.call_with_cache(token_ids, positions, caches, 0, key_mask)

    first = sample_on_device(logits[:, -1], temperature, top_k, top_p, seed, 0)
    tokens = ops.slice_update(ops.full((batch, slots), pad_id, "int32"), [0, 0], first[:, None])
    finished = ops.logical_and(eos_id >= 0, ops.equal(first, eos_id))
    out_lengths = ops.ones((batch,), "int32")
    state = (ops.convert_to_tensor(1, "int32"), first, tuple(tuple(c) for c in caches),
             key_mask, tokens, finished, out_lengths)

    def cond(step, token, caches, key_mask, tokens, finished, out_lengths):
        return ops.logical_and(step < max_new, ops.logical_not(ops.all(finished)))

    def body(step, token, caches, key_mask, tokens, finished, out_lengths):
        # Feed the previous token at cache slot width + step - 1.
        index = width + step - 1
        key_mask = ops.slice_update(key_mask, [0, index], ops.ones((batch, 1), "int32"))
        logits, caches = model.call_with_cache(
            token[:, None], (lengths + step - 1)[:, None], list(caches), index, key_mask)
        new = sample_on_device(logits[:, -1], temperature, top_k, top_p, seed, step)
        new = ops.where(finished, ops.cast(pad_id, "int32"), new)
        tokens = ops.slice_update(tokens, [0, step], new[:, None])
        out_lengths = out_lengths + ops.cast(ops.logical_not(finished), "int32")
        finished = ops.logical_or(finished, ops.logical_and(eos_id >= 0, ops.equal(new, eos_id)))
        return (step + 1, new, tuple(tuple(c) for c in caches), key_mask, tokens, finished,
                out_lengths)

    _, _, _, _, tokens, _, out_lengths = ops.while_loop(cond, body, state)
    return tokens[:, :max_new], ops.minimum(out_lengths, max_new)


class CompiledGenerate:
    """decode_loop for one (batch, prompt width, max_new_tokens, mode, cache
    dtype), compiled on the first call and reused. Sampling settings and the
    seed are runtime inputs, so they never cause a recompilation."""

    def __init__(self, model, batch, width, max_new_tokens, mode, cache_dtype, pad_id=0,
                 jit_compile: Optional[bool] = None):
        import keras

        self.model = model
        self.backend = keras.backend.backend()

        def run(ids, mask, temperature, top_k, top_p, eos_id, seed):
            return decode_loop(model, ids, mask, max_new_tokens, temperature, top_k, top_p,
                               eos_id, seed, mode, cache_dtype, pad_id)

        if self.backend == "jax":
            import jax

            def pure(trainable, non_trainable, *args):
                # Variable values are inputs (the jitted function sees trained
                # weights); the MoE load counters' updates are dropped.
                mapping = (list(zip(model.trainable_variables, trainable))
                           + list(zip(model.non_trainable_variables, non_trainable)))
                with keras.StatelessScope(state_mapping=mapping):
                    return run(*args)

            self._fn = jax.jit(pure)
        elif self.backend == "tensorflow":
            import tensorflow as tf

            spec = [tf.TensorSpec([batch, width], tf.int32), tf.TensorSpec([batch, width], tf.int32),
                    tf.TensorSpec([], tf.float32), tf.TensorSpec([], tf.int32),
                    tf.TensorSpec([], tf.float32), tf.TensorSpec([], tf.int32),
                    tf.TensorSpec([], tf.int32)]
            # Graph mode by default: XLA:CPU compiles the loop for minutes on TF.
            self._fn = tf.function(run, input_signature=spec, jit_compile=bool(jit_compile))
        else:
            raise NotImplementedError(f"compiled generation does not support {self.backend!r}")

    def __call__(self, ids, mask, temperature, top_k, top_p, eos_id, seed):
        args = (ids.astype(np.int32), mask.astype(np.int32), np.float32(temperature),
                np.int32(top_k), np.float32(top_p), np.int32(eos_id), np.int32(seed))
        if self.backend == "jax":
            tokens, lengths = self._fn([v.value for v in self.model.trainable_variables],
                                       [v.value for v in self.model.non_trainable_variables], *args)
        else:
            tokens, lengths = self._fn(*args)
        return np.asarray(tokens), np.asarray(lengths)

    def compilations(self) -> Optional[int]:
        """Traces of the underlying jit / tf.function (1 = compiled once)."""
        try:
            if self.backend == "jax":
                return int(self._fn._cache_size())
            return int(self._fn.experimental_get_tracing_count())
        except Exception:
            return None


# Compiled functions per model, by key (the model's own attributes are
# tracked by Keras, so they live outside it).
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compiled_functions(model) -> dict:
    """{(batch, width, max_new_tokens, mode, cache_dtype, pad_id): CompiledGenerate}."""
    return _COMPILED.setdefault(model, {})


# ---------------------------------------------------------------- the API
def generate_tokens(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    temperature: float = 0.0, top_k: Optional[int] = None,
                    top_p: Optional[float] = None, eos_id: Optional[int] = None,
                    seed: int = 0, mode: Optional[str] = None, pad_id: int = 0,
                    cache_dtype: str = "float32", compiled: bool = True
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """-> (tokens [B, max_new_tokens] int32, pad_id after each sequence's EOS;
    lengths [B] int32: new tokens per sequence, its EOS included)."""
    prompts = validate_request(model.config, prompts, max_new_tokens, temperature, top_k,
                               top_p, eos_id, seed)
    batch = len(prompts)
    if max_new_tokens == 0:
        return np.zeros((batch, 0), np.int32), np.zeros((batch,), np.int32)
    if not compiled:
        return _generate_eager(model, prompts, max_new_tokens, temperature, top_k, top_p,
                               eos_id, seed, mode, pad_id, cache_dtype)
    mode = mode or model.config.mla_mode
    width = prompt_bucket(max(len(p) for p in prompts), max_new_tokens,
                          model.config.max_position_embeddings)
    ids, mask = left_pad(prompts, pad_id, width)
    key = (batch, width, max_new_tokens, mode, str(cache_dtype), pad_id)
    functions = compiled_functions(model)
    if key not in functions:
        functions[key] = CompiledGenerate(model, batch, width, max_new_tokens, mode,
                                          cache_dtype, pad_id)
    return functions[key](ids, mask, temperature, top_k or 0, 1.0 if top_p is None else top_p,
                          -1 if eos_id is None else eos_id, seed)


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eos_id: Optional[int] = None,
             seed: int = 0, mode: Optional[str] = None, pad_id: int = 0,
             cache_dtype: str = "float32", compiled: bool = True) -> List[List[int]]:
    """Returns the new tokens of each prompt (ending at EOS when it appears).

    Greedy output is the same compiled or eager; sampled output is
    reproducible per seed on each path, but the two paths draw differently
    (backend RNG in the loop vs NumPy on the host)."""
    tokens, lengths = generate_tokens(model, prompts, max_new_tokens, temperature, top_k, top_p,
                                      eos_id, seed, mode, pad_id, cache_dtype, compiled)
    return [row[:n] for row, n in zip(tokens.tolist(), lengths.tolist())]


def _generate_eager(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, seed,
                    mode, pad_id, cache_dtype):
    """One eager call_with_cache per token, sampling in NumPy."""
    from keras import ops

    ids, mask = left_pad(prompts, pad_id)
    batch, width = ids.shape
    total = width + max_new_tokens
    rng = np.random.default_rng(seed)
    caches = model.init_caches(batch, total, mode=mode, dtype=cache_dtype)
    key_mask = np.zeros((batch, total), dtype=np.int32)
    key_mask[:, :width] = mask
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    lengths = mask.sum(1).astype(np.int32)

    logits, caches = model.call_with_cache(ids, positions, caches, 0, key_mask)
    out = np.full((batch, max_new_tokens), pad_id, dtype=np.int32)
    out_lengths = np.zeros(batch, dtype=np.int32)
    finished = np.zeros(batch, dtype=bool)
    for step in range(max_new_tokens):
        token = sample_next(ops.convert_to_numpy(logits[:, -1]), rng, temperature, top_k, top_p)
        token = np.where(finished, pad_id, token)
        out[:, step] = token
        out_lengths += ~finished
        if eos_id is not None:
            finished |= token == eos_id
        if finished.all() or step == max_new_tokens - 1:
            break
        index = width + step
        key_mask[:, index] = 1
        logits, caches = model.call_with_cache(
            token[:, None], (lengths + step)[:, None], caches, index, key_mask)
    return out, out_lengths
