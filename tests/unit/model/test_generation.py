"""Generation with the KV cache."""

import numpy as np
import pytest

from model import DeepSeekV3ForCausalLM, generate, get_preset
from model.generation import sample_next

pytestmark = [pytest.mark.unit, pytest.mark.model]


@pytest.fixture(scope="module")
def model():
    return DeepSeekV3ForCausalLM(get_preset("tiny"))


def _greedy_without_cache(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        logits = np.asarray(model(np.array([ids], "int32")))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("mode", ["absorbed", "naive"])
def test_cached_greedy_equals_recomputing_everything(model, mode):
    prompt = [3, 17, 5, 9]
    expected = _greedy_without_cache(model, prompt, 6)
    assert generate(model, [prompt], 6, mode=mode)[0] == expected


def test_batched_prompts_of_different_lengths_match_single_runs(model):
    prompts = [[1, 2, 3, 4, 5, 6], [7], [8, 9, 10]]
    batched = generate(model, prompts, 5)
    for prompt, out in zip(prompts, batched):
        assert out == generate(model, [prompt], 5)[0]


def test_eos_stops_a_sequence(model):
    first = generate(model, [[4, 4, 4]], 6)[0]
    eos = first[2]
    out = generate(model, [[4, 4, 4]], 6, eos_id=eos)[0]
    assert out == first[: first.index(eos) + 1]


def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
    prompt = [[5, 6, 7]]
    a = generate(model, prompt, 8, temperature=1.0, seed=3)
    assert a == generate(model, prompt, 8, temperature=1.0, seed=3)
    assert generate(model, prompt, 8, temperature=0.7, top_k=1, seed=9) == generate(model, prompt, 8)


def test_sample_next_filters():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(sample_next(logits, rng, 1.0, top_p=0.7)[0]) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; the tail is cut
    draws = {int(sample_next(logits, rng, 1.0, top_k=3)[0]) for _ in range(400)}
    assert draws == {0, 1, 2}


def test_bad_requests_are_refused(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], 3)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, [[1]], 10_000)
