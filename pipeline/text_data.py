"""The settings of a run on the user's own text (`--text-dir`), validated
before the pipeline is built, and the DAG's front for it:

    TokenizerGen (trains a SentencePiece BPE on the train split, or takes
    --tokenizer FILE) -> TextExampleGen (Beam: tokenize, pack to seq_len)

The tokenizer fixes the vocabulary: the model's vocab_size and the curated
schema's id range are the tokenizer's (a given tokenizer file is read here,
so its size is known when the pipeline is built).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

DEFAULT_VOCAB_SIZE = 2048


class TextSettingsError(ValueError):
    """An invalid text setting; names it."""


@dataclasses.dataclass(frozen=True)
class TextData:
    text_dir: str
    vocab_size: Optional[int] = None      # of a trained tokenizer (default DEFAULT_VOCAB_SIZE)
    tokenizer_file: Optional[str] = None  # a SentencePiece model to use instead
    eval_fraction: float = 0.1            # share of the documents held out

    def __post_init__(self):
        from data import text_corpus, text_tokenizer

        try:
            if not text_corpus.is_remote(self.text_dir):
                # A remote URI is checked where it is read (TokenizerGen's pod): the
                # compiling machine may have no credentials for the bucket.
                text_corpus.list_documents(self.text_dir)  # a directory with at least one file
            if not 0 < self.eval_fraction < 1:
                raise TextSettingsError(f"text_eval_fraction: must be in (0, 1), got {self.eval_fraction!r}")
            if self.tokenizer_file:
                if self.vocab_size is not None:
                    raise TextSettingsError("vocab_size: give --vocab-size or --tokenizer, not both "
                                            "(a tokenizer file has its own vocabulary)")
                text_tokenizer.read_model_file(self.tokenizer_file)
            else:
                text_tokenizer.check_vocab_size(self.resolved_vocab_size)
        except (text_corpus.TextCorpusError, text_tokenizer.TokenizerError) as e:
            raise TextSettingsError(str(e)) from None

    @property
    def resolved_vocab_size(self) -> int:
        """The tokenizer's vocabulary size: the file's, or the one to train."""
        if self.tokenizer_file:
            from data import text_tokenizer

            return text_tokenizer.describe(text_tokenizer.read_model_file(self.tokenizer_file)).vocab_size
        return DEFAULT_VOCAB_SIZE if self.vocab_size is None else self.vocab_size

    def identity(self) -> dict:
        """What defines the data, for the training fingerprint."""
        tokenizer = None
        if self.tokenizer_file:
            from data import text_tokenizer

            tokenizer = text_tokenizer.describe(text_tokenizer.read_model_file(self.tokenizer_file)).sha256
        import hashlib

        from data import text_corpus

        # Names and sizes: a changed corpus is another training, without
        # reading every file when the pipeline is built.
        files = hashlib.sha256()
        if not text_corpus.is_remote(self.text_dir):
            for doc in text_corpus.list_documents(self.text_dir):
                size = os.path.getsize(os.path.join(self.text_dir, doc))
                files.update(f"{doc}\0{size}\0".encode())
        return {"text_dir": _absolute(self.text_dir), "files": files.hexdigest(),
                "vocab_size": self.resolved_vocab_size, "tokenizer": tokenizer,
                "eval_fraction": self.eval_fraction}


def _absolute(path: str) -> str:
    from data.text_corpus import is_remote

    return path if is_remote(path) else os.path.abspath(path)


def text_example_gen(text: TextData, seq_len: int, batch_size: int):
    """(the TextExampleGen, [TokenizerGen, TextExampleGen]) of the DAG."""
    from components.text_example_gen import TextExampleGen
    from components.tokenizer import TokenizerGen

    tokenizer = TokenizerGen(text_dir=_absolute(text.text_dir),
                             vocab_size=text.resolved_vocab_size,
                             eval_fraction=text.eval_fraction,
                             tokenizer_file=_absolute(text.tokenizer_file) if text.tokenizer_file else "")
    example_gen = TextExampleGen(tokenizer=tokenizer.outputs["tokenizer"],
                                 text_dir=_absolute(text.text_dir), seq_len=seq_len,
                                 eval_fraction=text.eval_fraction, min_eval_rows=batch_size)
    return example_gen, [tokenizer, example_gen], tokenizer
