"""Unit tests for the pure-NumPy synthetic data package `data`."""

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data
from data import (
    BLOCK_SIZE,
    DataSpec,
    DataSpecError,
    bayes_token_losses,
    describe,
    empirical_bayes_loss,
    generate,
    markov_transition_matrix,
    mixture_weights,
    optimal_loss,
    optimal_loss_bounds,
    optimal_loss_is_exact,
    per_position_optimal_loss,
    shard_ranges,
    unigram_probs,
)

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]

SPECS = {
    "uniform": DataSpec("uniform", vocab_size=37, seq_len=16, seed=1),
    "zipf": DataSpec("zipf", vocab_size=50, seq_len=16, seed=2, exponent=1.2),
    "markov": DataSpec("markov", vocab_size=7, seq_len=16, seed=3, order=2, temperature=0.7),
    "copy": DataSpec("copy", vocab_size=11, seq_len=16, seed=4, prefix_length=5),
    "mixture": DataSpec(
        "mixture",
        vocab_size=7,
        seq_len=16,
        seed=5,
        components=[{"kind": "copy", "prefix_length": 3}, {"kind": "markov", "order": 1}, {"kind": "uniform"}],
        weights=[1.0, 2.0, 0.5],
    ),
}


def _z(values, target):
    """|mean - target| in standard errors of the mean."""
    values = np.asarray(values, dtype=np.float64)
    se = values.std(ddof=1) / math.sqrt(values.size)
    return abs(values.mean() - target) / max(se, 1e-300)


# ------------------------------------------------------------------ imports
def test_import_does_not_pull_in_tensorflow():
    code = "import sys, data, data.generators, data.tfrecord; assert 'tensorflow' not in sys.modules, 'tf imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


# --------------------------------------------------------------- determinism
@pytest.mark.parametrize("kind", sorted(SPECS))
def test_generate_is_deterministic(kind):
    spec = SPECS[kind]
    a = generate(spec, 40, start_index=7)
    data.models.build_model.cache_clear()  # rebuilding the model must not change anything
    b = generate(DataSpec.from_dict(spec.to_dict()), 40, start_index=7)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_different_seeds_give_different_data(kind):
    spec = SPECS[kind]
    other = DataSpec.from_dict({**spec.to_dict(), "seed": spec.seed + 100})
    assert not np.array_equal(generate(spec, 64), generate(other, 64))


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_shard_independence(kind):
    spec = SPECS[kind]
    full = generate(spec, 100)
    np.testing.assert_array_equal(full, np.concatenate([generate(spec, 50), generate(spec, 50, start_index=50)]))
    # Ranges straddling block boundaries, split at arbitrary points.
    start, n = BLOCK_SIZE - 3, BLOCK_SIZE + 10
    whole = generate(spec, n, start_index=start)
    cuts = [start, start + 1, start + 5, start + 700, start + n]
    pieces = [generate(spec, b - a, start_index=a) for a, b in zip(cuts[:-1], cuts[1:])]
    np.testing.assert_array_equal(whole, np.concatenate(pieces))
    # Each row is a function of its global index only.
    for i in (0, 3, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 6):
        np.testing.assert_array_equal(generate(spec, 1, start_index=i)[0], whole[i - start] if i >= start else full[i])


def test_shard_ranges_cover_range_on_block_boundaries():
    for n, shards, start in [(10_000, 3, 0), (3000, 4, 500), (5, 8, 2), (0, 2, 0), (BLOCK_SIZE * 4, 4, 0)]:
        ranges = shard_ranges(n, shards, start)
        assert len(ranges) <= shards
        covered = [i for s, c in ranges for i in range(s, s + c)]
        assert covered == list(range(start, start + n))
        for s, _ in ranges[1:]:
            assert s % BLOCK_SIZE == 0
    assert len(shard_ranges(BLOCK_SIZE * 4, 4)) == 4


def test_iter_generate_matches_generate():
    spec = SPECS["markov"]
    chunks = list(data.iter_generate(spec, 2 * BLOCK_SIZE + 5, start_index=3))
    assert all(len(c) <= BLOCK_SIZE for c in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks), generate(spec, 2 * BLOCK_SIZE + 5, start_index=3))


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_shape_dtype_and_token_range(kind):
    spec = SPECS[kind]
    x = generate(spec, 300, start_index=11)
    assert x.shape == (300, spec.seq_len) and x.dtype == np.int32
    assert x.min() >= 0 and x.max() < spec.vocab_size
    assert generate(spec, 0).shape == (0, spec.seq_len)


def test_generate_rejects_bad_arguments():
    spec = SPECS["uniform"]
    for kwargs in ({"num_sequences": -1}, {"num_sequences": 2.5}, {"num_sequences": 1, "start_index": -1}):
        with pytest.raises(ValueError):
            generate(spec, **kwargs)
    with pytest.raises(TypeError):
        generate(spec.to_dict(), 3)


# ----------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(kind="uniform", vocab_size=1, seq_len=8), "vocab_size"),
        (dict(kind="uniform", vocab_size=2.0, seq_len=8), "vocab_size"),
        (dict(kind="uniform", vocab_size=4, seq_len=1), "seq_len"),
        (dict(kind="uniform", vocab_size=4, seq_len=8, seed=-1), "seed"),
        (dict(kind="gaussian", vocab_size=4, seq_len=8), "kind"),
        (dict(kind="markov", vocab_size=4, seq_len=8, order=0), "order"),
        (dict(kind="markov", vocab_size=1024, seq_len=8, order=3), "order"),  # 2**30 contexts
        (dict(kind="markov", vocab_size=2**14, seq_len=8, order=1), "order"),  # 2**28 entries
        (dict(kind="markov", vocab_size=4, seq_len=8, temperature=0.0), "temperature"),
        (dict(kind="markov", vocab_size=4, seq_len=8, temperature=-1.0), "temperature"),
        (dict(kind="markov", vocab_size=4, seq_len=8, temperature=float("nan")), "temperature"),
        (dict(kind="zipf", vocab_size=4, seq_len=8, exponent=0.0), "exponent"),
        (dict(kind="zipf", vocab_size=4, seq_len=8, exponent=float("inf")), "exponent"),
        (dict(kind="copy", vocab_size=4, seq_len=8, prefix_length=0), "prefix_length"),
        (dict(kind="copy", vocab_size=4, seq_len=8, prefix_length=8), "prefix_length"),
        (dict(kind="uniform", vocab_size=4, seq_len=8, order=2), "order"),  # not a uniform parameter
        (dict(kind="zipf", vocab_size=4, seq_len=8, prefix_length=2), "prefix_length"),
        (dict(kind="mixture", vocab_size=4, seq_len=8), "components"),
        (dict(kind="mixture", vocab_size=4, seq_len=8, components=[]), "components"),
        (dict(kind="mixture", vocab_size=4, seq_len=8, components=[{"kind": "uniform"}], weights=[-1.0]), "weights"),
        (dict(kind="mixture", vocab_size=4, seq_len=8, components=[{"kind": "uniform"}] * 2, weights=[0, 0]), "weights"),
        (dict(kind="mixture", vocab_size=4, seq_len=8, components=[{"kind": "uniform"}] * 2, weights=[1.0]), "weights"),
        (
            dict(kind="mixture", vocab_size=4, seq_len=8, components=[DataSpec("uniform", 5, 8)]),
            "components[0].vocab_size",
        ),
        (dict(kind="mixture", vocab_size=4, seq_len=8, components=[DataSpec("uniform", 4, 9)]), "components[0].seq_len"),
        (dict(kind="mixture", vocab_size=4, seq_len=8, components=[{"kind": "markov", "order": 0}]), "components[0].order"),
    ],
)
def test_validation_errors_name_the_field(kwargs, field):
    with pytest.raises(DataSpecError) as info:
        DataSpec(**kwargs)
    assert info.value.field == field
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)


def test_defaults_are_filled_per_kind():
    assert DataSpec("markov", 4, 8).order == 1 and DataSpec("markov", 4, 8).temperature == 1.0
    assert DataSpec("zipf", 4, 8).exponent == 1.0
    assert DataSpec("copy", 4, 9).prefix_length == 4
    mix = DataSpec("mixture", 4, 8, seed=10, components=[{"kind": "uniform"}, {"kind": "zipf"}])
    assert mix.weights == (1.0, 1.0)
    assert [c.seed for c in mix.components] == [11, 12]
    assert all(c.vocab_size == 4 and c.seq_len == 8 for c in mix.components)


def test_dict_and_json_round_trip_and_describe():
    for spec in SPECS.values():
        assert DataSpec.from_dict(spec.to_dict()) == spec
        assert DataSpec.from_json(spec.to_json()) == spec
        d = describe(spec)
        json.dumps(d)  # JSON-serialisable
        assert DataSpec.from_dict(d) == spec
        assert d["optimal_loss"] == pytest.approx(optimal_loss(spec))
        assert d["optimal_loss_is_exact"] == (spec.kind != "mixture")
        assert d["optimal_loss_upper_bound"] >= d["optimal_loss"]
        assert hash(spec) == hash(DataSpec.from_dict(spec.to_dict()))
    with pytest.raises(DataSpecError) as info:
        DataSpec.from_dict({"kind": "uniform", "vocab_size": 4, "seq_len": 8, "colour": 1})
    assert info.value.field == "colour"
    with pytest.raises(DataSpecError) as info:
        DataSpec.from_dict({"kind": "uniform", "seq_len": 8})
    assert info.value.field == "vocab_size"


# ------------------------------------------------------------ optimal losses
def test_uniform_optimal_loss_is_log_vocab():
    for V in (2, 37, 50_000):
        assert optimal_loss(DataSpec("uniform", V, 10)) == pytest.approx(math.log(V), rel=1e-12)


def test_zipf_distribution_and_entropy():
    V, a = 200, 1.3
    ranks = np.arange(1, V + 1, dtype=np.float64) ** -a
    ref = ranks / ranks.sum()
    perms = []
    for seed in range(3):
        spec = DataSpec("zipf", V, 8, seed=seed, exponent=a)
        p = unigram_probs(spec)
        assert p.sum() == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(np.sort(p)[::-1], ref, rtol=1e-6, atol=1e-11)
        assert optimal_loss(spec) == pytest.approx(-(ref * np.log(ref)).sum(), rel=1e-9)
        perms.append(np.argsort(-p, kind="stable"))
    # The seed permutes which token is most frequent.
    assert len({tuple(p[:5]) for p in perms}) == 3


def test_copy_optimal_loss_closed_form_and_structure():
    V, L = 13, 20
    for P in (1, 2, 7, 19):
        spec = DataSpec("copy", V, L, seed=P, prefix_length=P)
        # Targets 1..P-1 are fresh uniform tokens, targets P..L-1 are copies.
        assert optimal_loss(spec) == pytest.approx((P - 1) * math.log(V) / (L - 1), rel=1e-12)
        x = generate(spec, 64)
        np.testing.assert_array_equal(x[:, P:], x[:, :-P])
        assert np.all(np.isfinite(bayes_token_losses(spec, x)))
        assert empirical_bayes_loss(spec, x) == pytest.approx(optimal_loss(spec), rel=1e-12)


def _all_sequences(V, L):
    return np.array(list(itertools.product(range(V), repeat=L)), dtype=np.int64)  # x_0 most significant


def _markov_joint(spec, seqs):
    P, V, k = markov_transition_matrix(spec), spec.vocab_size, spec.order
    joint = np.full(len(seqs), float(V) ** -min(k, spec.seq_len))
    for t in range(k, spec.seq_len):
        ctx = np.zeros(len(seqs), dtype=np.int64)
        for i in range(k):
            ctx = ctx * V + seqs[:, t - k + i]
        joint *= P[ctx, seqs[:, t]]
    return joint


def _conditional_entropies(joint, V, L):
    """Brute-force H(X_t | X_<t) for t = 1..L-1 from the full joint."""
    j = joint.reshape([V] * L)

    def H(t):  # entropy of X_0..X_t
        m = j.sum(axis=tuple(range(t + 1, L))).reshape(-1)
        m = m[m > 0]
        return -(m * np.log(m)).sum()

    return np.array([H(t) - H(t - 1) for t in range(1, L)])


@pytest.mark.parametrize("V, L, order, temperature", [(3, 6, 2, 1.0), (4, 6, 1, 0.5), (2, 7, 3, 2.0), (2, 3, 3, 1.0)])
def test_markov_optimal_loss_matches_brute_force(V, L, order, temperature):
    spec = DataSpec("markov", V, L, seed=V + L + order, order=order, temperature=temperature)
    seqs = _all_sequences(V, L)
    joint = _markov_joint(spec, seqs)
    assert joint.sum() == pytest.approx(1.0, abs=1e-12)
    expected = _conditional_entropies(joint, V, L)
    np.testing.assert_allclose(per_position_optimal_loss(spec), expected, rtol=0, atol=1e-12)
    assert optimal_loss(spec) == pytest.approx(expected.mean(), abs=1e-12)
    # Bayes scoring of every sequence, weighted by its probability, is the exact loss too.
    assert (joint @ bayes_token_losses(spec, seqs).mean(axis=1)) == pytest.approx(expected.mean(), abs=1e-10)


def test_markov_near_deterministic_table_leaves_only_partial_context_loss():
    V, L, k = 4, 24, 2
    spec = DataSpec("markov", V, L, seed=0, order=k, temperature=1e-4)
    P = markov_transition_matrix(spec)
    assert P.max(axis=1).min() > 1 - 1e-12  # the premise: transitions are deterministic
    # Only targets 1..k-1 (context shorter than the order) carry loss: ln V each.
    assert optimal_loss(spec) == pytest.approx((k - 1) * math.log(V) / (L - 1), abs=1e-9)
    x = generate(spec, 256)
    nxt = P.argmax(axis=1)
    for t in range(k, L):
        np.testing.assert_array_equal(x[:, t], nxt[x[:, t - 2] * V + x[:, t - 1]])


def test_markov_first_tokens_and_transitions_follow_the_table():
    spec = DataSpec("markov", 5, 40, seed=9, order=1, temperature=0.8)
    x = generate(spec, 3000)
    P = markov_transition_matrix(spec)
    np.testing.assert_allclose(P.sum(axis=1), 1.0, atol=1e-12)
    first = np.bincount(x[:, 0], minlength=5) / len(x)
    assert np.abs(first - 0.2).max() < 5 * math.sqrt(0.2 * 0.8 / len(x))
    counts = np.zeros((5, 5))
    np.add.at(counts, (x[:, :-1].ravel(), x[:, 1:].ravel()), 1)
    n = counts.sum(axis=1, keepdims=True)
    se = np.sqrt(P * (1 - P) / n) + 1e-12
    assert (np.abs(counts / n - P) / se).max() < 5


def test_zipf_frequencies_follow_distribution():
    spec = SPECS["zipf"]
    x = generate(spec, 4000)
    p = unigram_probs(spec)
    freq = np.bincount(x.ravel(), minlength=spec.vocab_size) / x.size
    se = np.sqrt(p * (1 - p) / x.size)
    assert (np.abs(freq - p) / se).max() < 5.5


@pytest.mark.parametrize(
    "spec",
    [
        DataSpec("markov", vocab_size=16, seq_len=32, seed=11, order=2, temperature=0.6),
        DataSpec("markov", vocab_size=256, seq_len=64, seed=12, order=1, temperature=1.0),
        DataSpec("zipf", vocab_size=1000, seq_len=32, seed=13, exponent=1.1),
        DataSpec("uniform", vocab_size=100, seq_len=32, seed=14),
    ],
    ids=["markov-o2", "markov-V256", "zipf", "uniform"],
)
def test_empirical_bayes_loss_matches_optimal(spec):
    x = generate(spec, 8 * BLOCK_SIZE)
    per_seq = bayes_token_losses(spec, x).mean(axis=1)
    assert empirical_bayes_loss(spec, x) == pytest.approx(per_seq.mean(), rel=1e-12)
    if spec.kind == "uniform":
        assert per_seq.mean() == pytest.approx(math.log(spec.vocab_size), rel=1e-12)
    else:
        assert _z(per_seq, optimal_loss(spec)) < 4.0


def test_markov_loss_is_not_trivially_uniform():
    # Sanity: a learnable chain has optimal loss well below ln V, and the
    # per-position losses show the uniform (partial-context) head.
    spec = DataSpec("markov", 32, 16, seed=1, order=2, temperature=0.5)
    pp = per_position_optimal_loss(spec)
    assert pp[0] == pytest.approx(math.log(32))
    assert pp[1:].max() < 0.8 * math.log(32)


# ---------------------------------------------------------------- mixtures
def _copy_joint(P, V, seqs):
    ok = np.all(seqs[:, P:] == seqs[:, :-P], axis=1)
    return np.where(ok, float(V) ** -P, 0.0)


def test_mixture_bounds_and_bayes_scorer_against_brute_force():
    V, L = 3, 6
    spec = DataSpec(
        "mixture",
        V,
        L,
        seed=21,
        components=[
            {"kind": "markov", "order": 1, "temperature": 0.5},
            {"kind": "zipf", "exponent": 2.0},
            {"kind": "copy", "prefix_length": 2},
        ],
        weights=[2.0, 1.0, 1.0],
    )
    assert not optimal_loss_is_exact(spec)
    w = mixture_weights(spec)
    np.testing.assert_allclose(w, [0.5, 0.25, 0.25], atol=1e-12)
    seqs = _all_sequences(V, L)
    markov, zipf, copy = spec.components
    p_zipf = unigram_probs(zipf)
    comp_joints = [_markov_joint(markov, seqs), np.prod(p_zipf[seqs], axis=1), _copy_joint(2, V, seqs)]
    joint = sum(wc * jc for wc, jc in zip(w, comp_joints))
    exact = _conditional_entropies(joint, V, L).mean()
    lower, upper = optimal_loss_bounds(spec)
    comp_exact = [_conditional_entropies(jc, V, L).mean() for jc in comp_joints]
    assert lower == pytest.approx(float(np.dot(w, comp_exact)), abs=1e-12)
    assert optimal_loss(spec) == lower
    entropy_w = -(w * np.log(w)).sum()
    assert upper == pytest.approx(lower + entropy_w / (L - 1), abs=1e-12)
    assert lower <= exact <= upper
    assert exact > lower + 1e-3  # the bound is not tight here: inferring z costs something
    # The Bayes scorer computes the exact posterior-predictive losses.
    assert (joint @ bayes_token_losses(spec, seqs).mean(axis=1)) == pytest.approx(exact, abs=1e-10)


def test_mixture_samples_components_in_proportion_and_scores_between_bounds():
    spec = SPECS["mixture"]
    x = generate(spec, 6 * BLOCK_SIZE)
    is_copy = np.all(x[:, 3:] == x[:, :-3], axis=1)  # other components almost never satisfy this
    w = mixture_weights(spec)
    assert abs(is_copy.mean() - w[0]) < 5 * math.sqrt(w[0] * (1 - w[0]) / len(x))
    per_seq = bayes_token_losses(spec, x).mean(axis=1)
    lower, upper = optimal_loss_bounds(spec)
    se = per_seq.std(ddof=1) / math.sqrt(len(per_seq))
    assert lower - 4 * se <= per_seq.mean() <= upper + 4 * se


def test_single_component_mixture_is_exact():
    inner = DataSpec("markov", 6, 12, seed=3, order=1)
    spec = DataSpec("mixture", 6, 12, seed=0, components=[inner, DataSpec("uniform", 6, 12)], weights=[1.0, 0.0])
    assert optimal_loss_is_exact(spec)
    assert optimal_loss_bounds(spec) == (pytest.approx(optimal_loss(inner)),) * 2


# ---------------------------------------------------------------- scoring
def test_scoring_validates_tokens_and_flags_impossible_ones():
    spec = DataSpec("copy", 5, 6, seed=0, prefix_length=2)
    with pytest.raises(ValueError):
        bayes_token_losses(spec, np.zeros((2, 5), dtype=np.int64))  # wrong seq_len
    with pytest.raises(ValueError):
        bayes_token_losses(spec, np.full((2, 6), 5))  # out of vocab
    with pytest.raises(ValueError):
        bayes_token_losses(spec, np.zeros((2, 6), dtype=np.float32))
    x = np.array([[0, 1, 0, 1, 0, 1], [0, 1, 0, 2, 0, 1]])
    losses = bayes_token_losses(spec, x)
    assert np.all(np.isfinite(losses[0]))
    assert np.isinf(losses[1, 2])  # target t=3 (index 2) breaks the copy
