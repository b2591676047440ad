"""Data-path throughput: the synthetic generator (tokens/s on one core) and
the TFRecord tf.data loader the Trainer uses (batches/s).

    python -m benchmarks.data_throughput --out benchmarks/results/data_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time


def _median_rate(fn, units: float, repeats: int):
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        rates.append(units / (time.perf_counter() - start))
    return statistics.median(rates), min(rates)


def measure(num_sequences: int = 8192, seq_len: int = 128, vocab: int = 256, batch_size: int = 32,
            repeats: int = 3) -> dict:
    from data import DataSpec, generate, write_tfrecords
    from data.tfrecord import make_dataset

    generators = {}
    for kind, params in (("markov", {"order": 1}), ("zipf", {}), ("copy", {}), ("uniform", {})):
        spec = DataSpec(kind, vocab_size=vocab, seq_len=seq_len, seed=0, **params)
        generate(spec, 1024)  # warm caches (transition tables)
        median, low = _median_rate(lambda: generate(spec, num_sequences), num_sequences * seq_len, repeats)
        generators[kind] = {"tokens_per_s": median, "min_tokens_per_s": low}

    spec = DataSpec("markov", vocab_size=vocab, seq_len=seq_len, seed=0, order=1)
    tokens = generate(spec, num_sequences)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.tfrecord.gz")
        write_tfrecords(path, tokens)
        batches = num_sequences // batch_size

        def read_all():
            ds = make_dataset(path, seq_len, batch_size, shuffle=True, seed=0, drop_remainder=True)
            for _ in ds:
                pass

        read_all()
        median, low = _median_rate(read_all, batches, repeats)
    return {"generator": generators,
            "loader": {"batches_per_s": median, "min_batches_per_s": low, "batch_size": batch_size,
                       "seq_len": seq_len, "compression": "GZIP", "shuffle": True}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sequences", type=int, default=8192)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    result = {"command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks.data_throughput"]
                                  + (argv if argv is not None else sys.argv[1:])),
              "machine": {"platform": platform.platform(), "cores": os.cpu_count()},
              **measure(num_sequences=args.sequences)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
