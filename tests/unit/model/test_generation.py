"""Generation with the KV cache: the compiled loop, the eager path and a full
recompute agree token for token; caches keep their dtype; bad requests are
refused with a message naming the problem."""

import numpy as np
import pytest

from model import DeepSeekV3ForCausalLM, generate, get_preset
from model.generation import GenerationRequestError, compiled_functions, generate_tokens, sample_next

pytestmark = [pytest.mark.unit, pytest.mark.model]

PROMPTS = [[1, 2, 3, 4, 5, 6], [7], [8, 9, 10]]  # different lengths: left padding


@pytest.fixture(scope="module")
def model():
    import keras

    keras.utils.set_random_seed(0)
    return DeepSeekV3ForCausalLM(get_preset("tiny"))


def _greedy_without_cache(model, prompt, steps, width=12):
    """Greedy tokens by a full forward per token. The row is right-padded to
    one fixed width (causal: the logits at the last real position ignore what
    follows), so eager JAX compiles its ops for one shape, not one per length
    (47 s -> a few)."""
    ids = list(prompt)
    assert len(ids) + steps <= width
    for _ in range(steps):
        row = np.zeros((1, width), "int32")
        row[0, :len(ids)] = ids
        logits = np.asarray(model(row))
        ids.append(int(logits[0, len(ids) - 1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("mode", ["absorbed", "naive"])
def test_compiled_equals_eager_equals_full_recompute(model, mode):
    expected = [_greedy_without_cache(model, p, 6) for p in PROMPTS]
    assert generate(model, PROMPTS, 6, mode=mode, compiled=False) == expected
    assert generate(model, PROMPTS, 6, mode=mode) == expected
    # Alone, a prompt generates what it generated in the batch.
    assert generate(model, [PROMPTS[1]], 6, mode=mode) == [expected[1]]


def test_one_compilation_per_batch_bucket_and_length(model):
    functions = compiled_functions(model)
    functions.clear()
    a = generate(model, [[1, 2, 3], [4]], 5)
    generate(model, [[5, 6], [7, 8, 9, 10]], 5, temperature=0.8, top_k=5, top_p=0.9, seed=1)
    generate(model, [[2], [3, 3, 3, 3, 3]], 5, eos_id=3)
    assert list(functions) == [(2, 16, 5, "absorbed", "float32", 0)]
    assert next(iter(functions.values())).compilations() == 1
    generate(model, [[1] * 20, [4]], 5)  # a longer bucket compiles once more
    assert len(functions) == 2
    assert generate(model, [[1, 2, 3], [4]], 5) == a


def test_eos_stops_each_sequence_at_its_own_length(model):
    greedy = generate(model, PROMPTS, 8)
    eos = greedy[0][2]
    tokens, lengths = generate_tokens(model, PROMPTS, 8, eos_id=eos)
    expected_lengths = [row.index(eos) + 1 if eos in row else 8 for row in greedy]
    assert lengths.tolist() == expected_lengths and lengths[0] == 3
    for row, full, n in zip(tokens.tolist(), greedy, expected_lengths):
        assert row[:n] == full[:n] and row[n:] == [0] * (8 - n)
    assert generate(model, PROMPTS, 8, eos_id=eos, compiled=False) == [
        g[:n] for g, n in zip(greedy, expected_lengths)]


def test_sampling_is_seeded_and_filters_reduce_to_greedy(model):
    greedy = generate(model, PROMPTS, 8)
    for compiled in (True, False):
        a = generate(model, PROMPTS, 8, temperature=1.0, seed=3, compiled=compiled)
        assert a == generate(model, PROMPTS, 8, temperature=1.0, seed=3, compiled=compiled)
        assert a != greedy
        assert generate(model, PROMPTS, 8, temperature=0.7, top_k=1, seed=9,
                        compiled=compiled) == greedy
        assert generate(model, PROMPTS, 8, temperature=1.0, top_p=1e-6, seed=9,
                        compiled=compiled) == greedy
    tokens, _ = generate_tokens(model, PROMPTS, 8, temperature=2.0, seed=5)
    assert tokens.min() >= 0 and tokens.max() < model.config.vocab_size


def test_compiled_top_k_and_top_p_keep_only_the_allowed_tokens():
    from keras import ops

    from model.generation import filter_logits, sample_on_device

    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]], "float32"))
    kept = lambda k, p: np.isfinite(ops.convert_to_numpy(filter_logits(logits, k, p)))
    assert kept(0, 0.7).tolist() == [[True, True, False, False], [False, False, True, True]]
    assert kept(3, 1.0).tolist() == [[True, True, True, False], [False, True, True, True]]
    assert kept(0, 1.0).all()
    draws = {tuple(ops.convert_to_numpy(sample_on_device(logits, 1.0, 0, 0.7, 0, s)).tolist())
             for s in range(40)}
    assert {d[0] for d in draws} == {0, 1} and {d[1] for d in draws} == {2, 3}


def test_sample_next_filters():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(sample_next(logits, rng, 1.0, top_p=0.7)[0]) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; the tail is cut
    draws = {int(sample_next(logits, rng, 1.0, top_k=3)[0]) for _ in range(400)}
    assert draws == {0, 1, 2}


@pytest.mark.parametrize("mode", ["absorbed", "naive"])
def test_bfloat16_cache_stays_bfloat16_at_half_the_bytes(model, mode):
    import keras

    def run(dtype, steps=10):
        caches = model.init_caches(2, 4 + steps, mode=mode, dtype=dtype)
        key_mask = np.zeros((2, 4 + steps), "int32")
        key_mask[:, :4] = 1
        positions = np.tile(np.arange(4, dtype="int32"), (2, 1))
        logits, caches = model.call_with_cache(np.array([[1, 2, 3, 4]] * 2, "int32"), positions,
                                               caches, 0, key_mask)
        for t in range(4, 4 + steps):
            key_mask[:, t] = 1
            token = np.asarray(logits)[:, -1].argmax(-1).astype("int32")[:, None]
            logits, caches = model.call_with_cache(token, np.full((2, 1), t, "int32"), caches, t,
                                                   key_mask)
        return caches

    bf16, f32 = run("bfloat16"), run("float32")
    assert {keras.backend.standardize_dtype(t.dtype) for c in bf16 for t in c} == {"bfloat16"}
    assert {keras.backend.standardize_dtype(t.dtype) for c in f32 for t in c} == {"float32"}
    nbytes = lambda caches: sum(np.asarray(t).size * (2 if "bfloat16" in str(t.dtype) else 4)
                                for c in caches for t in c)
    assert 2 * nbytes(bf16) == nbytes(f32)
    # The bf16 cache was really written (not left as zeros).
    assert np.any(np.asarray(bf16[0][0]).astype("float32") != 0)
    # Generation with a bf16 cache runs compiled and stays in the vocabulary.
    tokens, lengths = generate_tokens(model, PROMPTS, 4, mode=mode, cache_dtype="bfloat16")
    assert tokens.shape == (3, 4) and lengths.tolist() == [4, 4, 4]


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[[]]), "prompt 0 is empty"),
    (dict(prompts=[]), "non-empty list"),
    (dict(prompts=[[1, 64]]), "token id 64 outside the vocabulary"),
    (dict(prompts=[[1, -1]]), "token id -1 outside the vocabulary"),
    (dict(prompts=[[1, 2.5]]), "not an integer token id"),
    (dict(prompts=[[1]], max_new_tokens=10_000), "exceeds max_position_embeddings"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(eos_id=64), "eos_id must be a token id"),
])
@pytest.mark.parametrize("compiled", [True, False])
def test_bad_requests_are_refused_with_the_problem_named(model, kwargs, message, compiled):
    import re

    request = {"prompts": [[1, 2]], "max_new_tokens": 3, **kwargs}
    with pytest.raises(GenerationRequestError, match=re.escape(message)) as info:
        generate(model, request.pop("prompts"), request.pop("max_new_tokens"), compiled=compiled,
                 **request)
    assert isinstance(info.value, ValueError)
