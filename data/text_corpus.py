"""A directory of text as a corpus of documents: which files are documents,
how they are read (UTF-8, plain or gzip), the deterministic train / eval
split by document, and packing token ids into fixed-length rows.

No TensorFlow, Beam or tokenizer here: the tokenizer component
(`components.tokenizer`) and the text ExampleGen (`components.text_example_gen`)
both use these functions, so they agree on what the train split is.

* A document is one file under the directory (recursively; names starting
  with "." are skipped). A file whose first bytes are gzip's magic is read
  through gzip, whatever its name.
* The split: documents are ordered by the SHA-256 of their relative path and
  the first ceil(n * eval_fraction) of that order (at least one, when there
  are two or more documents) are eval, the rest train. It depends only on
  the names, so it is the same on every run and runner, and a document never
  straddles the splits.
* Packing: the documents of a shard, in path order, become one stream
  ``tokens(doc1) + [eod] + tokens(doc2) + [eod] + ...`` cut into rows of
  seq_len; the last partial row of a shard is dropped (counted).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import zlib
from typing import Iterable, Iterator, List, Sequence, Tuple

GZIP_MAGIC = b"\x1f\x8b"
#: Bytes of a file inspected for NUL bytes (the mark of a binary file).
_SNIFF_BYTES = 8192


class TextCorpusError(ValueError):
    """A text directory or file that cannot be a corpus; names the path."""


def is_remote(path: str) -> bool:
    """gs://, s3://, ...: read through TensorFlow's filesystems (in the pods)."""
    return "://" in str(path)


def file_size(path: str) -> int:
    if is_remote(path):
        import tensorflow as tf

        return int(tf.io.gfile.stat(path).length)
    return os.path.getsize(path)


def _read_bytes(path: str) -> bytes:
    if is_remote(path):
        import tensorflow as tf

        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def list_documents(text_dir: str) -> List[str]:
    """Relative paths (``/``-separated, sorted) of the documents under
    `text_dir`; raises TextCorpusError when it is missing or has none."""
    if is_remote(text_dir):
        import tensorflow as tf

        isdir, walk = tf.io.gfile.isdir, tf.io.gfile.walk
    else:
        isdir, walk = os.path.isdir, os.walk
    if not isdir(text_dir):
        raise TextCorpusError(f"text_dir {text_dir!r} is not a directory")
    found = []
    for root, dirs, files in walk(text_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            found.append(os.path.relpath(path, text_dir).replace(os.sep, "/"))
    if not found:
        raise TextCorpusError(f"text_dir {text_dir!r} holds no text files")
    return sorted(found)


def read_document(path: str) -> str:
    """The UTF-8 text of one file (gzip-compressed or plain). A binary file
    (NUL bytes), broken gzip or invalid UTF-8 raises TextCorpusError naming
    the file and where."""
    raw = _read_bytes(path)
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise TextCorpusError(f"{path}: not a readable gzip file ({e})") from None
    if b"\x00" in raw[:_SNIFF_BYTES]:
        raise TextCorpusError(f"{path}: a binary file (NUL bytes), not UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TextCorpusError(f"{path}: not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at "
                              f"offset {e.start})") from None
    if "\x00" in text:
        raise TextCorpusError(f"{path}: a binary file (NUL bytes), not UTF-8 text")
    return text.lstrip("\ufeff")


def split_documents(documents: Sequence[str], eval_fraction: float) -> Tuple[List[str], List[str]]:
    """(train, eval) relative paths, each sorted; see the module docstring."""
    if not 0 < eval_fraction < 1:
        raise TextCorpusError(f"eval_fraction: must be in (0, 1), got {eval_fraction!r}")
    ranked = sorted(documents, key=lambda d: hashlib.sha256(d.encode("utf-8")).hexdigest())
    n_eval = max(1, math.ceil(len(ranked) * eval_fraction)) if len(ranked) > 1 else 0
    return sorted(ranked[n_eval:]), sorted(ranked[:n_eval])


def shard_documents(documents: Sequence[str], sizes: Sequence[int],
                    shard_bytes: int) -> List[List[str]]:
    """Consecutive groups of `documents` (in order) of about `shard_bytes`
    each: the units of work of the ExampleGen (each packed on its own)."""
    shards, current, size = [], [], 0
    for doc, n in zip(documents, sizes):
        current.append(doc)
        size += n
        if size >= shard_bytes:
            shards.append(current)
            current, size = [], 0
    if current:
        shards.append(current)
    return shards


def pack(token_lists: Iterable[Sequence[int]], seq_len: int, eod_id: int
         ) -> Tuple[Iterator[List[int]], dict]:
    """Rows of `seq_len` ids from documents joined with `eod_id` after each.
    Returns (rows, counts) where counts ({"tokens", "dropped_tokens"}) is
    filled in once the rows are consumed."""
    counts = {"tokens": 0, "dropped_tokens": 0}

    def rows():
        buffer: List[int] = []
        for ids in token_lists:
            buffer.extend(ids)
            buffer.append(eod_id)
            counts["tokens"] += len(ids) + 1
            while len(buffer) >= seq_len:
                yield buffer[:seq_len]
                del buffer[:seq_len]
        counts["dropped_tokens"] = len(buffer)

    return rows(), counts


def iter_lines(text_dir: str, documents: Sequence[str], max_line_chars: int = 8192) -> Iterator[str]:
    """The non-empty lines of `documents`, long lines cut to max_line_chars
    (SentencePiece's trainer skips longer sentences)."""
    for doc in documents:
        for line in read_document(os.path.join(text_dir, doc)).splitlines():
            line = line.strip()
            for start in range(0, len(line), max_line_chars):
                yield line[start:start + max_line_chars]
