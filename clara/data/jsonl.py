"""JSON Lines input, with errors that name file, line and field; and atomic JSON Lines output.

Shared by the corpus reader (:mod:`clara.data.corpus`) and the training-record reader (:mod:`clara.data.records`)
so that both report a bad input file the same way. Without it a byte that is not UTF-8 surfaced as a
bare ``UnicodeDecodeError`` from the file iterator, and a ``"\\ud800"`` escape (valid JSON, invalid
Unicode) was accepted and only failed much later, inside the tokenizer or Arrow, with no file or line.

The callers pass their own error class: any ``error(where, field, message)`` exception, where
``where`` is ``"file:line"``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

#: ``error(where, field, message)``: the exception a reader raises (``DocumentError``, ``RecordError``).
ErrorFactory = Callable[[str, str, str], Exception]

_ESCAPED_BYTE = 0xDC00  # errors="surrogateescape" decodes an undecodable byte b to chr(0xDC00 + b)


def unicode_problem(text: str) -> str | None:
    """Why ``text`` is not valid Unicode, or ``None``.

    JSON may escape a lone UTF-16 surrogate (``"\\ud800"``); ``json.loads`` turns it into a ``str``
    that cannot be encoded as UTF-8, so hashing, tokenising or writing it fails far from its source.
    Checking the fields a reader keeps moves that failure to the file and line.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"contains an unpaired surrogate \\u{ord(text[e.start]):04x} at character {e.start + 1} "
                "(not valid Unicode; fix the escape in the source)")
    return None


def _line_utf8_problem(line: str) -> str | None:
    """Where a line read with ``errors="surrogateescape"`` held a byte that is not UTF-8, or ``None``."""
    if line.isascii():
        return None
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = ord(line[e.start]) - _ESCAPED_BYTE
        return f"is not UTF-8: byte 0x{byte:02x} at character {e.start + 1} (the file must be UTF-8 encoded)"
    return None


def read_jsonl(path: str | Path, error: ErrorFactory) -> Iterator[tuple[str, Any]]:
    """``("file:line", object)`` for each non-blank line of a JSON Lines file (see :func:`parse_jsonl`).

    The file is decoded with ``surrogateescape`` so that a bad byte stops the reader at its own
    line, not at the next read-ahead buffer.
    """
    path = Path(path)
    with path.open(encoding="utf-8", errors="surrogateescape") as f:
        yield from parse_jsonl(f, str(path), error)


def jsonl_lines(data: bytes) -> Iterator[str]:
    """The lines of a JSON Lines file read whole (a Ray Data binary file), decoded as :func:`read_jsonl` does."""
    for raw in data.split(b"\n"):
        yield raw.decode("utf-8", errors="surrogateescape")


def parse_jsonl(lines: Iterable[str], name: str, error: ErrorFactory) -> Iterator[tuple[str, Any]]:
    """``("name:line", object)`` for each non-blank line of ``lines`` (decoded with ``surrogateescape``).

    Raises ``error(where, field, message)``, with ``field`` one of ``<line>`` (a byte that is not
    UTF-8), ``<json>`` (not valid JSON) and ``<file>`` (no records at all: an empty or blank file,
    reported at line 1, where the first record should be).
    """
    records = 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        problem = _line_utf8_problem(line)
        if problem:
            raise error(where, "<line>", problem)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(where, "<json>", f"not valid JSON ({e.msg} at column {e.colno})") from None
        records += 1
        yield where, obj
    if not records:
        raise error(f"{name}:1", "<file>", "holds no records (the file is empty or blank)")


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``rows`` as JSON lines atomically: a temporary file beside ``path``, fsync'd, then renamed,
    so the file is either whole or absent (a crash part-way leaves no half-written output)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
