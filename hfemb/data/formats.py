"""Training and evaluation data: every format people already have, read into one ``Record``.

Readable formats (``fmt=``; ``"auto"`` detects them from the keys of the first valid row):

* ``hfemb``          ``{"query", "positive": str|list, "negative": [...]}`` (hfemb's mined output)
* ``flagembedding``  ``{"query", "pos": [...], "neg": [...]}`` (FlagEmbedding / EmbedRAG; ``neg`` optional)
* ``swift``          ``{"query", "response", "rejected_response": [...]}`` (ms-swift InfoNCE)
* ``swift_messages`` ``{"messages", "positive_messages", "negative_messages"}`` (newer ms-swift embedding
  docs; read only: each text is the last ``user`` message of its conversation)
* ``pos_doc``        ``{"query", "pos_doc": str|list}`` (positives only)
* ``pool``           ``{"query", "documents": [{"content", "label"}]}`` or the vertical-retrieval layout
  ``{"query", "content_private": [{"content", "is_relevant"}], "content_public": [...]}``. Unlabelled
  ``content_public`` items are *not* candidates (their relevance is unknown; calling them negatives would add
  false negatives): their texts are kept in ``extra["content_public"]``. Labelled public items join the pool.
* ``qa_table``       CSV/TSV/JSONL rows mapped by a ``ColumnMap``; the header ``department,title,ask,answer``
  is detected and read as query = title + "\\n" + ask, positive = answer (``department`` goes to ``extra``).
* ``qa_blocks``      text blocks separated by blank lines: question line, answer line (the line is kept
  verbatim; ``internal_medicine_qa_short.txt`` joins title and ask with ",").
* ``pairs``          ``{"text1"|"query"|"query1"|"sentence1", "text2"|"document"|"query2"|"sentence2", "label"}``;
  a headerless 3-column TSV/CSV (LCQMC) is read as text1, text2, label. Grouped by the first text.
* ``wikiqa``         WikiQA TSV (``QuestionID, Question, ..., Sentence, Label``), grouped by QuestionID.
* ``case_candidates`` case records with per-case candidates ``{"knowledge_option": [names], "knowledge_para":
  texts, "norm_syndrome", ...}`` (TCM-SD's ``_with_knowledge`` file), read as a labelled pool by
  ``hfemb.data.cases.candidate_record`` (default query template; label 1 for the case's own syndrome).

Containers: JSONL, a JSON array, ``.csv`` / ``.tsv`` (TSV read with ``QUOTE_NONE``), ``.txt`` (QA blocks), each
optionally ``.gz``; the whole file is read into memory. Labels are ints, bools, integral floats or integer
strings ("2", "1.0"); anything else (e.g. KUAKE-QQR's "NA") is a bad row, or always skipped with
``bad_label="skip"``. A pool's ``positives`` are the candidates with ``label >= label_threshold``, its
``negatives`` the rest; ``candidates`` keeps the raw labels. Texts are stripped of surrounding whitespace and
byte-order marks (LCQMC has a stray U+FEFF at the start of some texts).

Bad rows raise ``DataError`` naming file, line (1-based; a JSON array element's first line) and field; with
``on_error="skip"`` they are collected in ``ReadResult.skipped`` (each has a short ``kind``). A syntax error inside
a JSON array is always fatal (the parser cannot resume after it).
"""

from __future__ import annotations

import gzip
import io
import json
import os
from itertools import repeat
from typing import Iterable

from hfemb.data.cases import candidate_record
from hfemb.data.containers import block_rows, json_array_rows, jsonl_rows, object_row, read_text, table_rows
from hfemb.data.records import MEDICAL_QA_COLUMNS, STRIP_CHARS, ColumnMap, ReadResult, Record, bad_row, clean_text
from hfemb.errors import ConfigError, DataError
from hfemb.io_utils import atomic_open

FORMATS = ("hfemb", "flagembedding", "swift")  # writable formats 1, 2, 3
READ_FORMATS = FORMATS + ("swift_messages", "pos_doc", "pool", "qa_table", "qa_blocks", "pairs", "wikiqa",
                          "case_candidates")


# --------------------------------------------------------------------------- field values

def _text(row: dict, key: str, where: tuple[str, int], name: str | None = None) -> str:
    """The non-empty string ``row[key]``; errors name the field ``name`` (default ``key``)."""
    value, name = row.get(key), name or key
    if value is None:
        raise bad_row("missing field", *where, name)
    if not isinstance(value, str):
        raise bad_row("wrong type", *where, name, f"expected a string, got {type(value).__name__}")
    value = clean_text(value)
    if not value:
        raise bad_row("empty field", *where, name)
    return value


def _texts(row: dict, key: str, where: tuple[str, int], required: bool) -> list[str]:
    """A string or a list of strings; an optional field may be absent, null or ""."""
    value = row.get(key)
    if type(value) is list:  # fast path: a list of non-empty strings
        try:
            out = list(map(str.strip, value, repeat(STRIP_CHARS, len(value))))
        except TypeError:
            i, item = next((i, t) for i, t in enumerate(value) if not isinstance(t, str))
            raise bad_row("wrong type", *where, f"{key}[{i}]", f"expected a string, got {type(item).__name__}") from None
        if all(out) and (out or not required):
            return out
        if not out:
            raise bad_row("empty field", *where, key, "empty list")
        raise bad_row("empty field", *where, f"{key}[{out.index('')}]")
    if isinstance(value, str) and (value or required):
        return [_text(row, key, where)]
    if value is None or value == "":
        if required:
            raise bad_row("missing field", *where, key)
        return []
    raise bad_row("wrong type", *where, key, f"expected a list of strings, got {type(value).__name__}")


def _label(value, where: tuple[str, int], key: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                number = float(value)  # "1.0" as written by pandas
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
    raise bad_row("bad label", *where, key, f"expected an integer label, got {value!r}")


def _rest(row: dict, used: tuple[str, ...]) -> dict:
    """The row's other keys (for ``Record.extra``)."""
    if len(row) <= len(used) and all(k in used for k in row):
        return {}
    return {k: v for k, v in row.items() if k not in used}


# --------------------------------------------------------------------------- one row -> Record

def _row_hfemb(row, where, ctx):
    return Record(_text(row, "query", where), _texts(row, "positive", where, True),
                  _texts(row, "negative", where, False), extra=_rest(row, ("query", "positive", "negative")))


def _row_flagembedding(row, where, ctx):
    return Record(_text(row, "query", where), _texts(row, "pos", where, True), _texts(row, "neg", where, False),
                  extra=_rest(row, ("query", "pos", "neg")))


def _row_swift(row, where, ctx):
    return Record(_text(row, "query", where), _texts(row, "response", where, True),
                  _texts(row, "rejected_response", where, False),
                  extra=_rest(row, ("query", "response", "rejected_response")))


def _message_text(messages, where, key: str) -> str:
    """Content of the last user message of an ms-swift conversation."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise bad_row("wrong type", *where, key, "expected a list of {role, content} messages")
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        raise bad_row("missing field", *where, key, "no user message")
    return _text(users[-1], "content", where, f"{key}.content")


def _row_swift_messages(row, where, ctx):
    conversations = {}
    for key in ("positive_messages", "negative_messages"):
        value = row.get(key) or []
        if not isinstance(value, list):
            raise bad_row("wrong type", *where, key, "expected a list of message lists")
        conversations[key] = [_message_text(m, where, f"{key}[{i}]") for i, m in enumerate(value)]
    if not conversations["positive_messages"]:
        raise bad_row("missing field", *where, "positive_messages")
    return Record(_message_text(row.get("messages"), where, "messages"), conversations["positive_messages"],
                  conversations["negative_messages"],
                  extra=_rest(row, ("messages", "positive_messages", "negative_messages")))


def _row_pos_doc(row, where, ctx):
    return Record(_text(row, "query", where), _texts(row, "pos_doc", where, True),
                  extra=_rest(row, ("query", "pos_doc")))


def _pool_items(items, key: str, where, labelled: bool) -> tuple[list[tuple[str, int]], list[str]]:
    """Pool items -> (labelled candidates, unlabelled texts). ``labelled``: a label is required."""
    if not isinstance(items, list):
        raise bad_row("wrong type", *where, key, f"expected a list, got {type(items).__name__}")
    candidates, unlabelled = [], []
    for i, item in enumerate(items):
        name = f"{key}[{i}]"
        if isinstance(item, str) and not labelled:
            item = {"content": item}
        if not isinstance(item, dict):
            raise bad_row("wrong type", *where, name, "expected an object {content, label}")
        text = _text(item, "content", where, f"{name}.content")
        label_key = "label" if "label" in item else "is_relevant" if "is_relevant" in item else None
        if label_key is None:
            if labelled:
                raise bad_row("missing field", *where, f"{name}.label")
            unlabelled.append(text)
        else:
            candidates.append((text, _label(item[label_key], where, f"{name}.{label_key}")))
    return candidates, unlabelled


def _row_pool(row, where, ctx):
    query = _text(row, "query", where)
    extra = _rest(row, ("query", "documents", "content_private", "content_public"))
    if "documents" in row:
        candidates, _ = _pool_items(row["documents"], "documents", where, labelled=True)
    elif "content_private" in row:
        candidates, _ = _pool_items(row["content_private"], "content_private", where, labelled=True)
        public, unlabelled = _pool_items(row.get("content_public") or [], "content_public", where, labelled=False)
        candidates += public
        if unlabelled:
            extra["content_public"] = unlabelled
    else:
        raise bad_row("missing field", *where, "documents")
    return _pool_record(query, candidates, ctx["label_threshold"], extra)


def _pool_record(query, candidates, threshold, extra) -> Record:
    return Record(query, [t for t, lab in candidates if lab >= threshold],
                  [t for t, lab in candidates if lab < threshold], list(candidates), extra=extra)


def _row_qa_table(row, where, ctx):
    columns: ColumnMap = ctx["columns"]
    parts = []
    for name in columns.query:
        value = row.get(name)
        if value is None:
            raise bad_row("missing field", *where, name)
        if not isinstance(value, str):
            raise bad_row("wrong type", *where, name, f"expected a string, got {type(value).__name__}")
        value = clean_text(value)
        if value:
            parts.append(value)
    if not parts:
        raise bad_row("empty field", *where, "+".join(columns.query))
    return Record(columns.sep.join(parts), [_text(row, columns.positive, where)],
                  extra=_rest(row, (*columns.query, columns.positive)))


def _row_qa_blocks(row, where, ctx):
    return Record(_text(row, "question", where), [_text(row, "answer", where)])


PAIR_FIRST = ("text1", "query", "query1", "sentence1")
PAIR_SECOND = ("text2", "document", "query2", "sentence2")


def _row_pairs(row, where, ctx):
    """-> (group key, query, candidate text, label, extra of the group)."""
    first = next((k for k in PAIR_FIRST if k in row), PAIR_FIRST[0])
    second = next((k for k in PAIR_SECOND if k in row), PAIR_SECOND[0])
    query, text = _text(row, first, where), _text(row, second, where)
    if "label" not in row:
        raise bad_row("missing field", *where, "label")
    return query, query, text, _label(row["label"], where, "label"), {}


def _row_wikiqa(row, where, ctx):
    qid = _text(row, "QuestionID", where)
    query, text = _text(row, "Question", where), _text(row, "Sentence", where)
    if "Label" not in row:
        raise bad_row("missing field", *where, "Label")
    return qid, query, text, _label(row["Label"], where, "Label"), {"question_id": qid}


def _row_case_candidates(row, where, ctx):
    return candidate_record(row, where, label_threshold=ctx["label_threshold"])


_CONVERTERS = {
    "hfemb": _row_hfemb, "flagembedding": _row_flagembedding, "swift": _row_swift,
    "swift_messages": _row_swift_messages, "pos_doc": _row_pos_doc, "pool": _row_pool,
    "qa_table": _row_qa_table, "qa_blocks": _row_qa_blocks, "pairs": _row_pairs, "wikiqa": _row_wikiqa,
    "case_candidates": _row_case_candidates,
}
_GROUPED = ("pairs", "wikiqa")


def detect_format(keys: Iterable[str]) -> str | None:
    """The format a row with these keys belongs to, or None."""
    keys = set(keys)
    if {"department", "title", "ask", "answer"} <= keys:
        return "qa_table"
    if {"QuestionID", "Question", "Sentence", "Label"} <= keys:
        return "wikiqa"
    if {"knowledge_option", "knowledge_para"} <= keys:
        return "case_candidates"
    if "messages" in keys and "positive_messages" in keys:
        return "swift_messages"
    if "query" in keys and ("documents" in keys or "content_private" in keys):
        return "pool"
    if "label" in keys and not keys.isdisjoint(PAIR_FIRST) and not keys.isdisjoint(PAIR_SECOND):
        return "pairs"
    if "query" in keys:
        for key, fmt in (("positive", "hfemb"), ("pos", "flagembedding"), ("response", "swift"),
                         ("pos_doc", "pos_doc")):
            if key in keys:
                return fmt
    return None


# --------------------------------------------------------------------------- files -> raw rows



def _raw_rows(text: str, path: str, fmt: str, columns: ColumnMap | None):
    """-> (rows iterator, format forced by the container or None)."""
    name = path.lower().removesuffix(".gz")
    if fmt == "qa_blocks":
        return block_rows(text, path), "qa_blocks"
    extra_names = [*columns.query, columns.positive] if columns else []
    if name.endswith(".csv"):
        return table_rows(text, path, ",", extra_names), None
    if name.endswith(".tsv"):
        return table_rows(text, path, "\t", extra_names), None
    head = text.lstrip()[:1]
    if head == "[":
        return json_array_rows(text, path), None
    if head and head != "{" and fmt == "auto" and name.endswith(".txt"):
        return block_rows(text, path), "qa_blocks"
    return jsonl_rows(text, path), None


# --------------------------------------------------------------------------- public readers

def read_records(path, *, fmt: str = "auto", columns: ColumnMap | None = None, on_error: str = "raise",
                 label_threshold: int = 1, bad_label: str = "error") -> ReadResult:
    """Read a data file of any supported format (see the module docstring) into ``Record``s.

    ``on_error``: "raise" (first bad row raises ``DataError``) or "skip" (bad rows go to ``skipped``).
    ``bad_label``: "error" (a label such as "NA" is a bad row, handled by ``on_error``) or "skip" (such rows are
    always skipped and listed in ``skipped``). ``columns`` maps a QA table (implies ``fmt="qa_table"``).
    """
    if fmt != "auto" and fmt not in READ_FORMATS:
        raise ConfigError(f"unknown data format {fmt!r}; choose from auto, {', '.join(READ_FORMATS)}")
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if bad_label not in ("error", "skip"):
        raise ConfigError(f"bad_label must be 'error' or 'skip', got {bad_label!r}")
    if columns is not None and fmt not in ("auto", "qa_table"):
        raise ConfigError(f"--query-columns/--positive-column (data.query_columns/positive_column) map QA tables; "
                          f"they do not go with the format {fmt!r}")
    path = os.fspath(path)
    rows, forced = _raw_rows(read_text(path), path, fmt, columns)
    detected = forced or ("qa_table" if columns is not None else None if fmt == "auto" else fmt)
    ctx = {"columns": columns or MEDICAL_QA_COLUMNS, "label_threshold": label_threshold}
    records: list[Record] = []
    groups: dict[str, Record] = {}
    skipped: list[DataError] = []
    n_rows = 0
    for line, row in rows:
        n_rows += 1
        where = (path, line)
        try:
            row = object_row(row, path, line)
            if detected is None:
                detected = detect_format(row)
                if detected is None:
                    raise bad_row("unknown format", path, line, None,
                                  f"keys {sorted(row)} match no known format; name the format with --format "
                                  "(hfemb convert: --from; a training config: data.format) or map a QA table with "
                                  "--query-columns and --positive-column")
            converted = _CONVERTERS[detected](row, where, ctx)
        except DataError as exc:
            if on_error == "skip" or (bad_label == "skip" and getattr(exc, "kind", None) == "bad label"):
                skipped.append(exc)
                continue
            raise
        if detected in _GROUPED:
            key, query, text, label, extra = converted
            group = groups.get(key)
            if group is None:
                group = groups[key] = Record(query, [], source=f"{path}:{line}", extra=extra)
            group.candidates.append((text, label))
            (group.positives if label >= label_threshold else group.negatives).append(text)
        else:
            converted.source = f"{path}:{line}"
            records.append(converted)
    if n_rows == 0:
        raise DataError("no rows (empty file)", path)
    if groups:
        records = list(groups.values())
    if not records:
        raise DataError(f"no valid rows: all {len(skipped)} rows are bad; first: {skipped[0]}", path)
    return ReadResult(records, detected, path, skipped, n_rows)


def read_corpus(path) -> list[str]:
    """Mining corpus: JSONL rows ``{"text": ...}`` (or a JSON array of them / of strings), else plain text with
    one document a line. Blank lines are skipped; texts are stripped."""
    path = os.fspath(path)
    text = read_text(path)
    head = text.lstrip()[:1]
    if head == "[":
        rows = json_array_rows(text, path)
    elif head == "{":
        rows = jsonl_rows(text, path)
    else:
        docs = [clean_text(line) for line in text.split("\n")]
        docs = [d for d in docs if d]
        if not docs:
            raise DataError("no documents (empty file)", path)
        return docs
    docs = []
    for line, row in rows:
        if isinstance(row, DataError):
            raise row
        if isinstance(row, str):
            row = {"text": row}
        if not isinstance(row, dict):
            raise bad_row("not an object", path, line, None, f"expected {{\"text\": ...}}, got {type(row).__name__}")
        docs.append(_text(row, "text", (path, line)))
    if not docs:
        raise DataError("no documents (empty file)", path)
    return docs


# --------------------------------------------------------------------------- writers

_CORE_KEYS = {"hfemb": ("query", "positive", "negative"), "flagembedding": ("query", "pos", "neg"),
              "swift": ("query", "response", "rejected_response")}


def _check_record(record: Record) -> None:
    texts = [record.query, *record.positives, *record.negatives]
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise DataError("record has an empty or non-string text", record.source)
    if not record.positives:
        raise DataError("record has no positive; a training row needs one", record.source)


# extra keys each target tool reads; other extra keys are written only with ``extra="all"``
_TOOL_KEYS = {"hfemb": None, "flagembedding": ("prompt", "type", "pos_scores", "neg_scores"), "swift": ()}


def record_to_row(record: Record, fmt: str = "hfemb", *, extra: str = "auto") -> dict | list[dict]:
    """The row(s) of ``record`` in a writable format: ``hfemb`` and ``swift`` give one row per positive (negatives
    shared), ``flagembedding`` one row. ``extra`` says which ``Record.extra`` keys follow the format's own keys:
    "auto" (hfemb: all, e.g. ``mining``; flagembedding: the optional keys FlagEmbedding reads; swift: none),
    "all" or "none"."""
    if fmt not in FORMATS:
        raise ConfigError(f"cannot write format {fmt!r}; choose from {', '.join(FORMATS)}")
    if extra not in ("auto", "all", "none"):
        raise ConfigError(f"extra must be 'auto', 'all' or 'none', got {extra!r}")
    _check_record(record)
    core, wanted = _CORE_KEYS[fmt], _TOOL_KEYS[fmt]
    kept = {k: v for k, v in record.extra.items() if k not in core
            and (extra == "all" or (extra == "auto" and (wanted is None or k in wanted)))}
    if fmt == "flagembedding":
        return {"query": record.query, "pos": list(record.positives), "neg": list(record.negatives), **kept}
    return [{core[0]: record.query, core[1]: pos, core[2]: list(record.negatives), **kept}
            for pos in record.positives]


def write_records(records: Iterable[Record], path, fmt: str = "hfemb", *, extra: str = "auto") -> int:
    """Write records atomically (JSONL; a JSON array if ``path`` ends in .json; gzip if .gz); returns rows
    written. Records without a positive are not written (count them first if you need to report them).
    ``extra``: see ``record_to_row``."""
    if fmt not in FORMATS:
        raise ConfigError(f"cannot write format {fmt!r}; choose from {', '.join(FORMATS)}")
    if extra not in ("auto", "all", "none"):
        raise ConfigError(f"extra must be 'auto', 'all' or 'none', got {extra!r}")
    path = os.fspath(path)
    as_array = path.lower().removesuffix(".gz").endswith(".json")
    n = 0
    with atomic_open(path, "wb") as raw:
        fh = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if path.endswith(".gz") else raw
        out = io.TextIOWrapper(fh, encoding="utf-8", newline="\n")
        out.write("[\n" if as_array else "")
        for record in records:
            if not record.positives:
                continue
            rows = record_to_row(record, fmt, extra=extra)
            for row in rows if isinstance(rows, list) else (rows,):
                try:
                    line = json.dumps(row, ensure_ascii=False)
                except (TypeError, ValueError) as exc:
                    raise DataError(f"cannot write record: {exc}", record.source) from None
                out.write((",\n" if n else "") + line if as_array else line + "\n")
                n += 1
        out.write("\n]\n" if as_array and n else "]\n" if as_array else "")
        out.flush()
        out.detach()
        if fh is not raw:
            fh.close()
    return n


def count_duplicates(records: Iterable[Record]) -> int:
    """How many records repeat an earlier one exactly (same query, positives, negatives and labelled
    candidates): reported by ``convert`` and ``mine``, since repeated rows weigh a query more in training and
    in-batch copies of a row become false negatives."""
    seen: set = set()
    duplicates = 0
    for r in records:
        key = (r.query, tuple(r.positives), tuple(r.negatives), tuple(r.candidates))
        if key in seen:
            duplicates += 1
        else:
            seen.add(key)
    return duplicates
