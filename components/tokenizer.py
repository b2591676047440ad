"""TokenizerGen: the pipeline's tokenizer as an artifact (`components.Tokenizer`).

Either trains a SentencePiece BPE (byte fallback, pad/unk/bos/eos = 0..3,
`data.text_tokenizer.train_bpe`) on the *train* split of the text directory
(the split of `data.text_corpus.split_documents`, the one the text
ExampleGen uses, so no eval text shapes the vocabulary), or takes the user's
own SentencePiece model file (`tokenizer_file`). Before either, every
document of both splits is read once: an empty directory, a binary or
non-UTF-8 file stops the run here, naming the file, before any data is
written or any training starts.

Writes ``<uri>/tokenizer.model`` and ``<uri>/tokenizer.json``; custom
properties vocab_size, pad_id, unk_id, bos_id, eos_id, sha256, source,
train_documents, train_bytes, train_seconds (training only).
"""

import json
import os
import time

from tfx.dsl.component.experimental.annotations import OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component

from components.artifacts import Tokenizer

MODEL_FILE = "tokenizer.model"
INFO_FILE = "tokenizer.json"


def model_path(tokenizer_uri: str) -> str:
    return os.path.join(tokenizer_uri, MODEL_FILE)


def build_tokenizer(text_dir: str, vocab_size: int, eval_fraction: float,
                    tokenizer_file: str = "") -> tuple:
    """(model bytes, facts dict): the checks and the work of the component,
    without TFX (tests, benchmarks)."""
    from data import text_corpus, text_tokenizer

    documents = text_corpus.list_documents(text_dir)
    train, eval_ = text_corpus.split_documents(documents, eval_fraction)
    if not train:
        raise text_corpus.TextCorpusError(
            f"text_dir {text_dir!r}: {len(documents)} document(s) cannot make both a train and an "
            "eval split (a document is one file; add files)")
    sizes = {}
    for doc in documents:  # a bad file fails here, before anything is trained or written
        sizes[doc] = len(text_corpus.read_document(os.path.join(text_dir, doc)).encode("utf-8"))
    facts = {"train_documents": len(train), "eval_documents": len(eval_),
             "train_bytes": sum(sizes[d] for d in train)}
    if tokenizer_file:
        proto = text_tokenizer.read_model_file(tokenizer_file)
        facts["source"] = tokenizer_file
    else:
        started = time.perf_counter()
        proto = text_tokenizer.train_bpe(text_corpus.iter_lines(text_dir, train), vocab_size)
        facts["source"] = "trained"
        facts["train_seconds"] = time.perf_counter() - started
    info = text_tokenizer.describe(proto, tokenizer_file or "the trained tokenizer")
    if not tokenizer_file and info.vocab_size != vocab_size:
        raise text_tokenizer.TokenizerError(
            f"vocab_size: the trained tokenizer has {info.vocab_size} pieces, not {vocab_size}")
    facts.update(info.to_dict())
    return proto, facts


@component
def TokenizerGen(tokenizer: OutputArtifact[Tokenizer], text_dir: Parameter[str],
                 vocab_size: Parameter[int], eval_fraction: Parameter[float],
                 tokenizer_file: Parameter[str] = ""):
    """Trains (or takes) the SentencePiece tokenizer of the text corpus."""
    from tfx.dsl.io import fileio

    proto, facts = build_tokenizer(text_dir, vocab_size, eval_fraction, tokenizer_file)
    fileio.makedirs(tokenizer.uri)
    with fileio.open(model_path(tokenizer.uri), "wb") as f:
        f.write(proto)
    with fileio.open(os.path.join(tokenizer.uri, INFO_FILE), "w") as f:
        f.write(json.dumps(facts, indent=2, sort_keys=True))
    for key, value in facts.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            continue
        if isinstance(value, int):
            tokenizer.set_int_custom_property(key, value)
        elif isinstance(value, float):
            tokenizer.set_float_custom_property(key, value)
        else:
            tokenizer.set_string_custom_property(key, value)
