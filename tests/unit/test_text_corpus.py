"""The text corpus (documents, split, packing) and the SentencePiece
tokenizer on the KJV fixture, and every bad input they must refuse with one
line naming the file or setting."""

import gzip
import os

import pytest

from data import text_corpus, text_tokenizer

pytestmark = pytest.mark.unit

KJV = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "text", "kjv")


def test_documents_are_the_files_plain_and_gzip():
    docs = text_corpus.list_documents(KJV)
    assert len(docs) == 28 and docs == sorted(docs)
    plain = text_corpus.read_document(os.path.join(KJV, "08-ruth.txt.gz"))
    assert plain.startswith("Now it came to pass in the days when the judges ruled")
    assert "Naomi" in plain


def test_split_is_by_document_deterministic_and_disjoint():
    docs = text_corpus.list_documents(KJV)
    train, eval_ = text_corpus.split_documents(docs, 0.1)
    assert len(eval_) == 3 and len(train) == 25 and not set(train) & set(eval_)
    # the order it is given in does not matter; only the names
    assert text_corpus.split_documents(list(reversed(docs)), 0.1) == (train, eval_)
    # a new document changes at most which one document moves
    train2, eval2 = text_corpus.split_documents(docs + ["zz-new.txt"], 0.1)
    assert len(set(eval_) - set(eval2)) <= 1


def test_pack_joins_documents_with_eod_and_drops_the_tail():
    rows, counts = text_corpus.pack([[5, 6, 7], [8], [9, 10, 11, 12]], seq_len=4, eod_id=3)
    assert list(rows) == [[5, 6, 7, 3], [8, 3, 9, 10]]
    assert counts == {"tokens": 11, "dropped_tokens": 3}


@pytest.mark.parametrize("content, expected", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary file"),
    ("caf\u00e9".encode("latin-1"), "not UTF-8 text (invalid byte 0xe9 at offset 3)"),
    (b"\x1f\x8b\x08\x00garbage", "not a readable gzip file"),
])
def test_bad_files_are_named(tmp_path, content, expected):
    (tmp_path / "good.txt").write_text("fine text\n")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(content)
    with pytest.raises(text_corpus.TextCorpusError) as e:
        [text_corpus.read_document(str(tmp_path / d)) for d in text_corpus.list_documents(str(tmp_path))]
    assert str(bad) in str(e.value) and expected in str(e.value)
    assert "\n" not in str(e.value)


def test_empty_or_missing_dir(tmp_path):
    with pytest.raises(text_corpus.TextCorpusError, match="holds no text files"):
        text_corpus.list_documents(str(tmp_path))
    with pytest.raises(text_corpus.TextCorpusError, match="is not a directory"):
        text_corpus.list_documents(str(tmp_path / "nope"))


def test_trained_bpe_has_the_vocab_byte_fallback_and_specials():
    train, _ = text_corpus.split_documents(text_corpus.list_documents(KJV), 0.1)
    proto = text_tokenizer.train_bpe(text_corpus.iter_lines(KJV, train), 400)
    assert proto == text_tokenizer.train_bpe(text_corpus.iter_lines(KJV, train), 400)  # deterministic
    info = text_tokenizer.describe(proto)
    assert (info.vocab_size, info.pad_id, info.unk_id, info.bos_id, info.eos_id) == (400, 0, 1, 2, 3)
    sp = text_tokenizer.processor(proto)
    text = "And the Lord said: 日本 ñ"  # characters the corpus never had: bytes, not <unk>
    ids = sp.encode(text)
    assert info.unk_id not in ids and sp.decode(ids) == text
    assert len(sp.encode("the Lord")) <= len("the Lord") // 2  # merges learned from the text
    # The ExampleGen encodes line by line: the ids of the whole text.
    doc = text_corpus.read_document(os.path.join(KJV, "65-jude.txt")) + "\n\n  indented\nlast"
    assert [i for line in sp.encode(doc.split("\n")) for i in line] == sp.encode(doc)


def test_tokenizer_file_that_does_not_parse(tmp_path):
    bad = tmp_path / "tok.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(text_tokenizer.TokenizerError, match=f"tokenizer {bad}: not a SentencePiece model"):
        text_tokenizer.read_model_file(str(bad))
    with pytest.raises(text_tokenizer.TokenizerError, match="No such file"):
        text_tokenizer.read_model_file(str(tmp_path / "missing.model"))


def test_text_settings_refuse_bad_input_before_anything_runs(tmp_path):
    from pipeline.settings import PipelineSettings, SettingsError

    with pytest.raises(SettingsError, match="holds no text files"):
        PipelineSettings(run_dir=str(tmp_path / "r"), text_dir=str(tmp_path))
    (tmp_path / "tok.model").write_bytes(b"junk")
    with pytest.raises(SettingsError, match="not a SentencePiece model"):
        PipelineSettings(run_dir=str(tmp_path / "r"), text_dir=KJV, tokenizer_file=str(tmp_path / "tok.model"))
    with pytest.raises(SettingsError, match="vocab_size: must be an integer in"):
        PipelineSettings(run_dir=str(tmp_path / "r"), text_dir=KJV, vocab_size=100)
    with pytest.raises(SettingsError, match="differs from the tokenizer's 512"):
        PipelineSettings(run_dir=str(tmp_path / "r"), text_dir=KJV, vocab_size=512,
                         model_overrides={"vocab_size": 128})
    assert not (tmp_path / "r").exists()


def test_model_vocab_comes_from_the_tokenizer(tmp_path):
    from pipeline.settings import PipelineSettings

    train, _ = text_corpus.split_documents(text_corpus.list_documents(KJV), 0.1)
    path = tmp_path / "tok.model"
    path.write_bytes(text_tokenizer.train_bpe(text_corpus.iter_lines(KJV, train), 333))
    s = PipelineSettings(run_dir=str(tmp_path / "r"), text_dir=KJV, tokenizer_file=str(path))
    assert s.model_config.vocab_size == 333
    other = PipelineSettings(run_dir=str(tmp_path / "r"), text_dir=KJV, vocab_size=640)
    assert other.model_config.vocab_size == 640
    assert s.training_fingerprint() != other.training_fingerprint()


def test_gzip_text_is_read_whatever_its_name(tmp_path):
    path = tmp_path / "doc.txt"  # gzip content without the .gz name
    path.write_bytes(gzip.compress("hello world\n".encode()))
    assert text_corpus.read_document(str(path)) == "hello world\n"
