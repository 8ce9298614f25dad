"""The one in-memory form of training and evaluation data (``Record``), the QA-table column mapping, a read's
result, and the error and text-cleaning helpers shared by every reader (``hfemb.data.formats``,
``hfemb.data.cases``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hfemb.errors import ConfigError, DataError


@dataclass
class Record:
    """One query with its documents, whatever file format it came from.

    * ``positives``: relevant documents (at least one for training rows).
    * ``negatives``: irrelevant documents given by the file (mined or labelled 0), in file order.
    * ``candidates``: the labelled pool as given (``(text, label)``; label > 0 is relevant), for
      formats that have one (``documents`` / ``content_private`` pools, pair rows). Positives and
      negatives of a pool record are derived from it.
    * ``source``: ``"path:line"`` of the row, for error messages and reports.
    * ``extra``: anything else worth carrying (``id``, ``mining`` info of mined rows, ...).
    """

    query: str
    positives: list[str]
    negatives: list[str] = field(default_factory=list)
    candidates: list[tuple[str, int]] = field(default_factory=list)
    source: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class ColumnMap:
    """QA-table mapping: ``query`` columns joined by ``sep`` (empty parts skipped), ``positive`` column."""

    query: list[str]
    positive: str
    sep: str = "\n"


MEDICAL_QA_COLUMNS = ColumnMap(query=["title", "ask"], positive="answer")


def column_map_from_flags(query_columns: str | None, positive_column: str | None,
                          query_sep: str = "\\n") -> ColumnMap | None:
    """The ``ColumnMap`` of the CLI flags ``--query-columns a,b --positive-column c [--query-sep S]`` (``S`` may
    spell ``\\n`` / ``\\t``); None when neither is given; ``ConfigError`` when only one is, or no column."""
    if not query_columns and not positive_column:
        return None
    if not (query_columns and positive_column):
        raise ConfigError("--query-columns and --positive-column go together")
    query = [c.strip() for c in query_columns.split(",") if c.strip()]
    if not query:
        raise ConfigError("--query-columns names no column")
    sep = query_sep.replace("\\n", "\n").replace("\\t", "\t")
    return ColumnMap(query=query, positive=positive_column.strip(), sep=sep)


@dataclass
class ReadResult:
    records: list[Record]
    format: str
    path: str
    skipped: list[DataError] = field(default_factory=list)
    rows: int = 0  # rows (or blocks) read, good and bad


# --------------------------------------------------------------------------- errors and field values

def bad_row(kind: str, path: str, line: int | None, field: str | None = None, detail: str = "") -> DataError:
    """A ``DataError`` for one bad row, with a short ``kind`` ("missing field", "bad label", ...) that
    ``on_error="skip"`` reports count by."""
    err = DataError(f"{kind}: {detail}" if detail else kind, path, line, field)
    err.kind = kind
    return err


# what clean_text strips: every character str.isspace() accepts (all are below U+3001), plus the byte-order mark
STRIP_CHARS = "".join(chr(c) for c in range(0x3001) if chr(c).isspace()) + "\ufeff"


def clean_text(text: str) -> str:
    """``text`` without surrounding whitespace (any Unicode space) or byte-order marks."""
    return text.strip(STRIP_CHARS)


def labelled_documents(record: Record) -> list[tuple[str, int]]:
    """The record's labelled pool: its ``candidates`` when it has them, else positives (label 1) then
    negatives (label 0)."""
    return record.candidates or [(t, 1) for t in record.positives] + [(t, 0) for t in record.negatives]
