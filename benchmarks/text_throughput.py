"""Text-path throughput: SentencePiece BPE training (TokenizerGen's work) and
the TextExampleGen on Beam's DirectRunner (read, tokenize, pack, write GZIP
TFRecords), in MB of UTF-8 text per second.

    python scripts/kjv_corpus.py /tmp/kjv            # the whole KJV, 4.1 MB (apt-get install bible-kjv)
    python -m benchmarks.text_throughput --text-dir /tmp/kjv --out benchmarks/results/text_cpu.json

Without --text-dir it measures the test fixture (tests/fixtures/text/kjv, 0.25 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "tests", "fixtures", "text", "kjv")


def _example_gen(text_dir: str, proto: bytes, seq_len: int, workdir: str, beam_args) -> dict:
    from tfx.dsl.components.base import base_beam_executor
    from tfx.types import standard_artifacts

    from components.artifacts import Tokenizer
    from components.text_example_gen import TextExampleGenExecutor
    from components.tokenizer import model_path

    tokenizer = Tokenizer()
    tokenizer.uri = os.path.join(workdir, "tokenizer")
    os.makedirs(tokenizer.uri)
    with open(model_path(tokenizer.uri), "wb") as f:
        f.write(proto)
    examples = standard_artifacts.Examples()
    examples.uri = os.path.join(workdir, "examples")
    executor = TextExampleGenExecutor(base_beam_executor.BaseBeamExecutor.Context(
        beam_pipeline_args=beam_args, tmp_dir=os.path.join(workdir, "tmp")))
    start = time.perf_counter()
    executor.Do({"tokenizer": [tokenizer]}, {"examples": [examples]},
                {"text_dir": text_dir, "seq_len": seq_len, "eval_fraction": 0.1, "min_eval_rows": 1})
    seconds = time.perf_counter() - start
    props = {k: examples.get_int_custom_property(k) for k in
             ("train_bytes", "eval_bytes", "train_tokens", "eval_tokens", "train_rows", "eval_rows")}
    return {"seconds": seconds, **props}


def measure(text_dir: str, vocab_size: int, seq_len: int) -> dict:
    from components.tokenizer import build_tokenizer
    from data import text_corpus

    docs = text_corpus.list_documents(text_dir)
    total = sum(len(text_corpus.read_document(os.path.join(text_dir, d)).encode()) for d in docs)
    start = time.perf_counter()
    proto, facts = build_tokenizer(text_dir, vocab_size, 0.1)
    build_seconds = time.perf_counter() - start
    mb = 1e6
    result = {
        "corpus": {"text_dir": os.path.abspath(text_dir), "documents": len(docs), "bytes": total},
        "tokenizer": {"vocab_size": vocab_size, "train_bytes": facts["train_bytes"],
                      "train_seconds": facts["train_seconds"],
                      "train_mb_per_s": facts["train_bytes"] / mb / facts["train_seconds"],
                      "component_seconds": build_seconds},
    }
    with tempfile.TemporaryDirectory() as workdir:
        gen = _example_gen(text_dir, proto, seq_len, workdir,
                           ["--direct_running_mode=in_memory", "--direct_num_workers=1"])
    gen["mb_per_s"] = (gen["train_bytes"] + gen["eval_bytes"]) / mb / gen["seconds"]
    gen["tokens_per_s"] = (gen["train_tokens"] + gen["eval_tokens"]) / gen["seconds"]
    gen["bytes_per_token"] = (gen["train_bytes"] + gen["eval_bytes"]) / (gen["train_tokens"] + gen["eval_tokens"])
    result["text_example_gen"] = gen
    sp_start = time.perf_counter()
    from data.text_tokenizer import processor

    sp = processor(proto)
    for d in docs:
        sp.encode(text_corpus.read_document(os.path.join(text_dir, d)))
    result["encode_only_mb_per_s"] = total / mb / (time.perf_counter() - sp_start)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text-dir", default=FIXTURE)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--out")
    args = p.parse_args(argv)
    result = {"benchmark": "text_throughput", "machine": {"cpus": os.cpu_count(),
                                                          "python": platform.python_version()},
              **measure(args.text_dir, args.vocab_size, args.seq_len)}
    text = json.dumps(result, indent=2)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
