"""SentencePiece tokenizers: training a BPE with byte fallback, reading a
user's model file, and the facts the pipeline needs from either (vocab size,
special ids). No TensorFlow here; the SavedModel's copy of the tokenizer is
tensorflow-text's SentencepieceTokenizer over the same model bytes
(`components.text_export`).

Special ids of a trained tokenizer: pad 0, unk 1, bos 2, eos 3. eos is also
the end-of-document token the text ExampleGen puts between documents; a
user's model must have an eos piece for that reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from typing import Iterable

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
#: 256 byte pieces + the 4 specials + a few merges: the smallest BPE that trains.
MIN_VOCAB_SIZE = 300
MAX_VOCAB_SIZE = 1 << 20


class TokenizerError(ValueError):
    """A tokenizer that cannot be trained or read; names the file or setting."""


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    vocab_size: int
    pad_id: int
    unk_id: int
    bos_id: int
    eos_id: int
    sha256: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _processor(model_proto: bytes, source: str):
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_proto=model_proto)
    except Exception as e:  # sentencepiece raises RuntimeError / OSError with C++ text
        first = " ".join(str(e).split())[:200]
        raise TokenizerError(f"{source}: not a SentencePiece model ({first})") from None


def describe(model_proto: bytes, source: str = "tokenizer") -> TokenizerInfo:
    """The tokenizer's facts; raises TokenizerError naming `source` when the
    bytes do not parse or lack an eos piece."""
    if not model_proto:
        raise TokenizerError(f"{source}: empty file, not a SentencePiece model")
    sp = _processor(model_proto, source)
    if sp.eos_id() < 0:
        raise TokenizerError(f"{source}: the SentencePiece model has no eos piece (needed as the "
                             "end-of-document token)")
    return TokenizerInfo(vocab_size=int(sp.vocab_size()), pad_id=int(sp.pad_id()),
                         unk_id=int(sp.unk_id()), bos_id=int(sp.bos_id()),
                         eos_id=int(sp.eos_id()), sha256=hashlib.sha256(model_proto).hexdigest())


def read_model_file(path: str) -> bytes:
    """The bytes of a SentencePiece model file, checked (TokenizerError names it)."""
    from data.text_corpus import _read_bytes

    try:
        proto = _read_bytes(path)  # local, or gs:// etc. through TensorFlow
    except OSError as e:
        raise TokenizerError(f"tokenizer {path!r}: {e.strerror or e}") from None
    except Exception as e:  # tf.errors.NotFoundError and friends for remote paths
        raise TokenizerError(f"tokenizer {path!r}: {' '.join(str(e).split())[:200]}") from None
    describe(proto, f"tokenizer {path}")
    return proto


def check_vocab_size(vocab_size) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) \
            or not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise TokenizerError(f"vocab_size: must be an integer in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}] "
                             f"(byte fallback needs 256 pieces + specials), got {vocab_size!r}")
    return vocab_size


def train_bpe(lines: Iterable[str], vocab_size: int, num_threads: int = 2,
              max_sentences: int = 2_000_000) -> bytes:
    """A SentencePiece BPE model (bytes) trained on `lines`: byte fallback
    (no text is ever unknown), every character kept, specials pad/unk/bos/eos
    at 0..3. Deterministic for the same lines."""
    import sentencepiece as spm

    check_vocab_size(vocab_size)
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=writer, vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, character_coverage=1.0,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            num_threads=num_threads, input_sentence_size=max_sentences,
            shuffle_input_sentence=True, max_sentence_length=1 << 14, minloglevel=2)
    except RuntimeError as e:  # e.g. "Vocabulary size is too high"
        message = " ".join(str(e).split())
        raise TokenizerError(f"training the tokenizer failed: {message[-300:]}") from None
    return writer.getvalue()


def processor(model_proto: bytes):
    """A sentencepiece.SentencePieceProcessor over the model bytes."""
    return _processor(model_proto, "tokenizer")
