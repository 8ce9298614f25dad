"""File containers -> raw rows: JSONL, a top-level JSON array, CSV/TSV and QA text blocks, each yielding
``(line, row)`` where a bad row is a ``DataError`` (from ``hfemb.data.records.bad_row``) for the caller to raise
or skip. Shared by ``hfemb.data.formats`` and ``hfemb.data.cases``."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
from typing import Iterable, Iterator

from hfemb.data.records import bad_row
from hfemb.errors import ConfigError, DataError

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
HEADER_NAMES = frozenset(  # a first CSV/TSV row with any of these is a header
    "query positive negative pos neg response rejected_response pos_doc text1 text2 query1 query2 sentence1 "
    "sentence2 document label id department title ask answer questionid question sentence documents".split())


DEFAULT_MAX_ROW_BYTES = 1 << 20  # 1 MiB: far above any real query or passage, far below what exhausts memory
MAX_ROW_ENV = "HFEMB_MAX_ROW_BYTES"


def max_row_bytes() -> int:
    """The largest row (a line of a JSONL/CSV/TSV/text file, an element of a JSON array) hfemb reads, in bytes:
    ``$HFEMB_MAX_ROW_BYTES`` when set, else 1 MiB. Mining and training hold each text several times over
    (tokens, BM25 statistics, batches), so one huge row can take gigabytes; a larger row is a `DataError`
    naming its file and line."""
    value = os.environ.get(MAX_ROW_ENV, "")
    if not value:
        return DEFAULT_MAX_ROW_BYTES
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ConfigError(f"{MAX_ROW_ENV}={value!r}: expected a positive number of bytes")
    return limit


def row_too_large(path: str, line: int, size: int, limit: int) -> DataError:
    """The `DataError` for a row of ``size`` bytes over ``limit``."""
    return DataError(f"row of {size:,} bytes exceeds the limit of {limit:,} bytes (set {MAX_ROW_ENV} to allow "
                     "larger rows; memory grows with the row)", path, line)


def check_row_sizes(data: bytes, path: str, limit: int | None = None) -> None:
    """Raise `DataError` naming the first line of ``data`` longer than ``limit`` bytes (`max_row_bytes`).
    Each step jumps to the last newline within the next ``limit + 1`` bytes (a C-level search), so it takes
    about ``2 * len(data) / limit`` steps."""
    limit = max_row_bytes() if limit is None else limit
    pos, n = 0, len(data)
    while n - pos > limit:
        newline = data.rfind(b"\n", pos, pos + limit + 1)
        if newline < 0:  # limit + 1 bytes from a line start without a newline
            end = data.find(b"\n", pos)
            raise row_too_large(path, data.count(b"\n", 0, pos) + 1, (n if end < 0 else end) - pos, limit)
        pos = newline + 1


def read_text(path: str) -> str:
    """The whole file (``.gz`` decompressed) as text; a missing, unreadable or non-UTF-8 file is a ``DataError``."""
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as fh:
            data = fh.read()
    except FileNotFoundError:
        raise DataError("no such file", path) from None
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read file: {exc}", path) from None
    if not data.lstrip()[:1] == b"[":  # JSON arrays: checked per element (pretty-printed rows span lines)
        check_row_sizes(data, path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"not valid UTF-8 (byte {exc.start}); save the file as UTF-8", path, line) from None
    return text[1:] if text[:1] == "\ufeff" else text


def jsonl_rows(text: str, path: str) -> Iterator[tuple[int, object]]:
    """``(line, parsed object)`` per non-blank JSONL line; an unparsable line yields a ``DataError`` instead."""
    loads = json.loads
    for lineno, raw in enumerate(text.split("\n"), 1):
        if not raw or raw.isspace():
            continue
        try:
            yield lineno, loads(raw)
        except json.JSONDecodeError as exc:
            yield lineno, bad_row("invalid JSON", path, lineno, None, f"{exc.msg} (column {exc.colno})")


def json_array_rows(text: str, path: str) -> Iterator[tuple[int, object]]:
    """Elements of a top-level JSON array with the line each starts on."""
    pos = _WS.match(text, text.index("[") + 1).end()
    line, counted = 1, 0
    limit = max_row_bytes()
    if text.startswith("]", pos) and not text[pos + 1:].strip():
        return
    while pos < len(text):
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            start = pos
            obj, pos = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON: {exc.msg} (column {exc.colno})", path, exc.lineno) from None
        if pos - start > limit // 4 and len(text[start:pos].encode("utf-8")) > limit:  # chars <= bytes <= 4 chars
            raise row_too_large(path, line, len(text[start:pos].encode("utf-8")), limit)
        yield line, obj
        pos = _WS.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
            continue
        if text.startswith("]", pos) and not text[pos + 1:].strip():
            return
        raise DataError("invalid JSON: expected ',' or ']' after an array element", path,
                        1 + text.count("\n", 0, pos))
    raise DataError("invalid JSON: the array is not closed", path, 1 + text.count("\n"))


def table_rows(text: str, path: str, delimiter: str, extra_names: Iterable[str]) -> Iterator[tuple[int, object]]:
    """CSV/TSV rows as dicts. A first row without any known column name is data: text1, text2, label."""
    csv.field_size_limit(1 << 30)
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    header, known = None, HEADER_NAMES | {n.lower() for n in extra_names}
    end = 0
    while True:
        start = end + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"bad CSV: {exc}", path, reader.line_num) from None
        end = reader.line_num
        if not cells or (len(cells) == 1 and not cells[0].strip()):
            continue
        if header is None:
            if any(c.strip().lower() in known for c in cells):
                header = [c.strip() for c in cells]
                continue
            if len(cells) != 3:
                raise DataError(f"no header row (expected column names such as query, text1, label; "
                                f"or 3 headerless columns text1, text2, label; got {len(cells)} columns)", path, start)
            header = ["text1", "text2", "label"]
        if len(cells) != len(header):
            yield start, bad_row("wrong column count", path, start, None,
                                 f"expected {len(header)} columns, got {len(cells)}")
            continue
        yield start, dict(zip(header, cells))


def block_rows(text: str, path: str) -> Iterator[tuple[int, object]]:
    """``(line, {"question", "answer"})`` per blank-line-separated block of 2 lines; other blocks yield a ``DataError``."""
    block, start = [], 0
    for lineno, raw in enumerate(text.split("\n") + [""], 1):
        if raw.strip():
            if not block:
                start = lineno
            block.append(raw)
            continue
        if block:
            if len(block) == 2:
                yield start, {"question": block[0], "answer": block[1]}
            else:
                yield start, bad_row("bad block", path, start, None,
                                     f"expected 2 lines (question, answer), got {len(block)}")
            block = []


def object_row(row, path: str, line: int) -> dict:
    """A raw row as a JSON object: a ``DataError`` row (a bad line) is raised, any other non-object is a
    "not an object" ``DataError``."""
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        raise bad_row("not an object", path, line, None, f"expected a JSON object, got {type(row).__name__}")
    return row
