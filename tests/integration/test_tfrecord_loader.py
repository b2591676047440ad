"""TFRecord writing and the tf.data loader of `data.tfrecord`, end to end."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from data import DataSpec, generate  # noqa: E402
from data.tfrecord import make_dataset, sequence_to_example, serialize_sequences, write_tfrecords  # noqa: E402

pytestmark = pytest.mark.integration

SPEC = DataSpec("markov", vocab_size=300, seq_len=24, seed=7, order=1)


def _collect(ds):
    batches = [b["input_ids"].numpy() for b in ds]
    return batches, (np.concatenate(batches) if batches else np.zeros((0, SPEC.seq_len), np.int32))


def _sorted_rows(x):
    return x[np.lexsort(x.T[::-1])]


@pytest.mark.parametrize("compression", ["GZIP", "ZLIB", None])
def test_round_trip_in_order(tmp_path, compression):
    tokens = generate(SPEC, 10)
    path = tmp_path / "seqs.tfrecord"
    assert write_tfrecords(str(path), tokens, compression=compression) == 10
    ds = make_dataset(str(path), SPEC.seq_len, batch_size=4, shuffle=False, compression=compression)
    batches, got = _collect(ds)
    assert [b.shape for b in batches] == [(4, 24), (4, 24), (2, 24)]
    assert all(b.dtype == np.int32 for b in batches)
    np.testing.assert_array_equal(got, tokens)


def test_drop_remainder_repeat_and_static_shape(tmp_path):
    tokens = generate(SPEC, 10)
    write_tfrecords(str(tmp_path / "a.tfrecord.gz"), tokens)
    ds = make_dataset(str(tmp_path / "*.gz"), SPEC.seq_len, 4, shuffle=False, drop_remainder=True)
    assert ds.element_spec["input_ids"].shape.as_list() == [4, 24]
    assert ds.element_spec["input_ids"].dtype == tf.int32
    batches, got = _collect(ds)
    assert len(batches) == 2
    np.testing.assert_array_equal(got, tokens[:8])
    _, twice = _collect(make_dataset(str(tmp_path / "*.gz"), SPEC.seq_len, 5, shuffle=False, repeat=2))
    np.testing.assert_array_equal(twice, np.concatenate([tokens, tokens]))
    forever = make_dataset(str(tmp_path / "*.gz"), SPEC.seq_len, 3, shuffle=True, seed=1, repeat=True)
    assert len(list(forever.take(25))) == 25  # more than one epoch's worth of batches


def test_multiple_files_and_shuffle(tmp_path):
    tokens = generate(SPEC, 300)
    for i in range(3):
        write_tfrecords(str(tmp_path / f"part-{i:05d}.gz"), tokens[i * 100 : (i + 1) * 100])
    pattern = str(tmp_path / "part-*")
    _, ordered = _collect(make_dataset(pattern, SPEC.seq_len, 64, shuffle=False))
    np.testing.assert_array_equal(ordered, tokens)  # sorted file order, records in order

    _, shuffled_a = _collect(make_dataset(pattern, SPEC.seq_len, 64, shuffle=True, seed=3, shuffle_buffer_size=128))
    _, shuffled_b = _collect(make_dataset(pattern, SPEC.seq_len, 64, shuffle=True, seed=3, shuffle_buffer_size=128))
    np.testing.assert_array_equal(shuffled_a, shuffled_b)  # seeded -> reproducible
    assert not np.array_equal(shuffled_a, tokens)
    np.testing.assert_array_equal(_sorted_rows(shuffled_a), _sorted_rows(tokens))  # same multiset


def test_example_encoding():
    tokens = generate(SPEC, 3)
    ex = sequence_to_example(tokens[0])
    assert list(ex.features.feature["input_ids"].int64_list.value) == tokens[0].tolist()
    serialized = serialize_sequences(tokens)
    parsed = tf.io.parse_example(serialized, {"input_ids": tf.io.FixedLenFeature([SPEC.seq_len], tf.int64)})
    np.testing.assert_array_equal(parsed["input_ids"].numpy(), tokens)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="no files match"):
        make_dataset(str(tmp_path / "nothing-*"), 8, 2)
    write_tfrecords(str(tmp_path / "x.gz"), generate(SPEC, 4))
    with pytest.raises(ValueError):
        make_dataset(str(tmp_path / "x.gz"), 8, 0)
    with pytest.raises(ValueError):
        make_dataset(str(tmp_path / "x.gz"), 8, 2, compression="LZ4")
    with pytest.raises(tf.errors.InvalidArgumentError):  # wrong seq_len is caught at parse time
        _collect(make_dataset(str(tmp_path / "x.gz"), SPEC.seq_len + 1, 2, shuffle=False))
