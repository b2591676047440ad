"""Writes the King James Bible (public domain; Debian's `bible-kjv` package,
read with its `bible` program) as a plain-text corpus: one UTF-8 file per
book (a document), chapter headings and verse numbers removed, one paragraph
per verse. Used for the real-text run and benchmark (README, benchmarks/).

    apt-get install -y bible-kjv
    python scripts/kjv_corpus.py OUT_DIR [--books N] [--gzip]
"""

import argparse
import gzip
import os
import re
import shutil
import subprocess
import sys

BOOKS = (
    "Genesis Exodus Leviticus Numbers Deuteronomy Joshua Judges Ruth 1Samuel 2Samuel 1Kings "
    "2Kings 1Chronicles 2Chronicles Ezra Nehemiah Esther Job Psalms Proverbs Ecclesiastes Song "
    "Isaiah Jeremiah Lamentations Ezekiel Daniel Hosea Joel Amos Obadiah Jonah Micah Nahum "
    "Habakkuk Zephaniah Haggai Zechariah Malachi Matthew Mark Luke John Acts Romans 1Corinthians "
    "2Corinthians Galatians Ephesians Philippians Colossians 1Thessalonians 2Thessalonians "
    "1Timothy 2Timothy Titus Philemon Hebrews James 1Peter 2Peter 1John 2John 3John Jude "
    "Revelation").split()

_VERSE = re.compile(r"^\s+\d+ ")
_CHAPTER = re.compile(r"^\S.* \d+$")


def book_text(book: str) -> str:
    out = subprocess.run(["bible", f"{book}1:1-999:999"], check=True, capture_output=True,
                         text=True).stdout
    verses, current = [], []
    for line in out.splitlines():
        if not line.strip() or _CHAPTER.match(line):
            continue
        if _VERSE.match(line):
            if current:
                verses.append(" ".join(current))
            current = [_VERSE.sub("", line, count=1).strip()]
        else:
            current.append(line.strip())
    if current:
        verses.append(" ".join(current))
    return "\n".join(verses) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--books", type=int, default=len(BOOKS), help="the first N books")
    p.add_argument("--gzip", action="store_true", help="write book files as .txt.gz")
    args = p.parse_args(argv)
    if shutil.which("bible") is None:
        print("kjv_corpus: the `bible` program is missing (apt-get install bible-kjv)", file=sys.stderr)
        return 1
    os.makedirs(args.out_dir, exist_ok=True)
    for i, book in enumerate(BOOKS[:args.books]):
        text = book_text(book)
        name = os.path.join(args.out_dir, f"{i + 1:02d}-{book.lower()}.txt")
        if args.gzip:
            with gzip.open(name + ".gz", "wt", encoding="utf-8") as f:
                f.write(text)
        else:
            with open(name, "w", encoding="utf-8") as f:
                f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
