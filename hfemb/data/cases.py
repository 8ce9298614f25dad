"""Case records + a knowledge base → training and evaluation records (TCM syndrome differentiation, TCM-SD).

Clinical data comes as case records (fields such as ``chief_complaint``, ``medical_history``, ``FDMR``) with
a label (``norm_syndrome``) and a knowledge base mapping each label to its description. Each case becomes a
``Record``: query = the case fields rendered by a *query template*, positive = the knowledge text of its label.

Query template: ``str.format`` placeholders naming case fields, one field per line by default::

    主诉：{chief_complaint}
    现病史：{medical_history}
    四诊摘要：{FDMR}

A template line whose placeholders are all empty (``""``, whitespace or ``null``) is dropped, so empty fields
are skipped; a field absent from a row is an error (it catches typos). ``query_template(fields, names)``
builds such a template from field names and display names (``FIELD_NAMES`` knows the TCM-SD ones).

Knowledge bases (:func:`read_knowledge`): TSV/text ``name<TAB>text`` lines (``knowledge_corpus_sample.txt``;
an optional header such as ``syndrome<TAB>text``), or JSONL / a JSON array of objects with the name in
``name``, ``syndrome`` or ``label`` and the text in ``text``, ``knowledge`` or ``content``. A name given twice
is an error naming both lines. A case file in the candidate layout (below) is read as the knowledge base of
all its candidates.

Per-case candidate layout (TCM-SD's ``_with_knowledge`` file): each case also has ``knowledge_option`` (the
candidate names) and ``knowledge_para`` (their texts, one string of paragraphs each starting with
``"<name>的定义是"``, or a list). :func:`candidate_record` reads such a row as a labelled pool (label 1 for the
case's own syndrome); :func:`knowledge_from_candidates` collects all candidates into a knowledge base.
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

from hfemb.data.containers import json_array_rows, jsonl_rows, object_row, read_text, table_rows
from hfemb.data.records import Record, bad_row, clean_text
from hfemb.errors import ConfigError, DataError
from hfemb.io_utils import write_jsonl

DEFAULT_QUERY_FIELDS = ("chief_complaint", "medical_history", "FDMR")
FIELD_NAMES = {"chief_complaint": "主诉", "medical_history": "现病史", "FDMR": "四诊摘要",
               "lcd_name": "疾病", "syndrome": "证型"}
DEFAULT_LABEL_FIELD = "norm_syndrome"
ID_FIELDS = ("example_id", "case_id", "id")
OPTION_FIELD, PARA_FIELD = "knowledge_option", "knowledge_para"
KNOWLEDGE_NAME_KEYS = ("name", "syndrome", "label")
KNOWLEDGE_TEXT_KEYS = ("text", "knowledge", "content")
PARA_MARKER = "的定义是"  # TCM-SD: each knowledge_para paragraph starts with "<syndrome>的定义是"


def query_template(fields: Sequence[str] = DEFAULT_QUERY_FIELDS, names: dict[str, str] | None = None) -> str:
    """One ``name：{field}`` line per field (``name: {field}`` for names without CJK characters); a field's
    name comes from ``names``, else ``FIELD_NAMES``, else the field itself."""
    if not fields:
        raise ConfigError("no query field given")
    lines = []
    for f in fields:
        name = (names or {}).get(f) or FIELD_NAMES.get(f, f)
        colon = "：" if any("\u2e80" <= ch <= "\u9fff" for ch in name) else ": "
        lines.append(f"{name.replace('{', '{{').replace('}', '}}')}{colon}{{{f}}}")
    return "\n".join(lines)


def parse_query_fields(spec: str) -> tuple[list[str], dict[str, str]]:
    """``"chief_complaint=主诉,medical_history,FDMR"`` -> fields and the display names given with ``=``."""
    fields, names = [], {}
    for part in spec.split(","):
        key, _, name = part.partition("=")
        key = key.strip()
        if not key:
            continue
        fields.append(key)
        if name.strip():
            names[key] = name.strip()
    if not fields:
        raise ConfigError(f"--query-fields names no field: {spec!r}")
    return fields, names


def case_settings(fields_spec: str | None = None, label_field: str | None = None,
                  template: str | None = None) -> CaseSettings:
    """``CaseSettings`` from command-line values: ``--query-fields F[=NAME],...`` (``fields_spec``) or
    ``--query-template T`` (``\\n`` / ``\\t`` read as newline / tab), ``--label-field F``; None = TCM-SD default."""
    if fields_spec and template:
        raise ConfigError("give --query-fields or --query-template, not both")
    if template:
        template = template.replace("\\n", "\n").replace("\\t", "\t")
    else:
        template = query_template(*parse_query_fields(fields_spec)) if fields_spec else query_template()
    return CaseSettings(template=template, label_field=label_field or DEFAULT_LABEL_FIELD)


def template_fields(template: str) -> list[str]:
    """The case fields a template reads, in order."""
    try:
        out = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ConfigError(f"bad query template {template!r}: {exc}") from None
    if not out or any(not f or not f.strip() for f in out):
        raise ConfigError(f"query template {template!r} must name case fields in braces, e.g. {{chief_complaint}}")
    return list(dict.fromkeys(out))


@dataclass
class CaseSettings:
    """How a case row becomes a query and a label."""

    template: str = field(default_factory=query_template)
    label_field: str = DEFAULT_LABEL_FIELD
    id_field: str | None = None  # None: the first of ID_FIELDS the row has (else "line N")

    def __post_init__(self) -> None:
        self.fields = template_fields(self.template)
        if not self.label_field:
            raise ConfigError("label field is empty")


def _value(row: dict, key: str, where) -> str:
    if key not in row:
        raise bad_row("missing field", *where, key)
    value = row[key]
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise bad_row("wrong type", *where, key, f"expected a string, got {type(value).__name__}")
    return clean_text(str(value))


def render_query(row: dict, settings: CaseSettings, where) -> str:
    """The query text of a case: template lines whose fields are all empty are dropped."""
    values = {f: _value(row, f, where) for f in settings.fields}
    if not any(values.values()):
        raise bad_row("empty field", *where, "+".join(settings.fields), "every query field is empty")
    lines = []
    for line in settings.template.split("\n"):
        used = [f for _, f, _, _ in string.Formatter().parse(line) if f]
        if used and not any(values[f] for f in used):
            continue
        lines.append(line.format_map(values))
    return "\n".join(lines).strip()


def case_label(row: dict, settings: CaseSettings, where) -> str:
    label = _value(row, settings.label_field, where)
    if not label:
        raise bad_row("empty field", *where, settings.label_field, "no label")
    return label


def case_id(row: dict, settings: CaseSettings, line: int) -> str:
    keys = (settings.id_field,) if settings.id_field else ID_FIELDS
    for key in keys:
        if row.get(key) not in (None, ""):
            return str(row[key])
    return f"line {line}"


# --------------------------------------------------------------------------- the per-case candidate layout

def is_candidate_row(keys: Iterable[str]) -> bool:
    return {OPTION_FIELD, PARA_FIELD} <= set(keys)


def split_candidates(row: dict, where) -> list[tuple[str, str]]:
    """``(name, text)`` of each candidate of a ``knowledge_option`` / ``knowledge_para`` row, in order."""
    options = row.get(OPTION_FIELD)
    if not isinstance(options, list) or not options or not all(isinstance(o, str) and clean_text(o) for o in options):
        raise bad_row("wrong type", *where, OPTION_FIELD, "expected a non-empty list of candidate names")
    names = [clean_text(o) for o in options]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise bad_row("duplicate candidate", *where, OPTION_FIELD, f"{dup!r} is listed twice")
    para = row.get(PARA_FIELD)
    if isinstance(para, list):
        if len(para) != len(names) or not all(isinstance(p, str) and clean_text(p) for p in para):
            raise bad_row("wrong type", *where, PARA_FIELD, f"expected {len(names)} non-empty texts, one per candidate")
        return [(n, clean_text(p)) for n, p in zip(names, para)]
    if not isinstance(para, str) or not clean_text(para):
        raise bad_row("wrong type", *where, PARA_FIELD, "expected the candidates' texts (a string or a list)")
    starts, cursor = [], 0
    for i, name in enumerate(names):
        pos = para.find(name + PARA_MARKER, cursor)
        if pos < 0:  # no marker: the name at the start of the text or after whitespace
            pos = next((p for p in _find_all(para, name, cursor) if p == 0 or para[p - 1].isspace()), -1)
        if pos < 0:
            raise bad_row("bad candidates", *where, PARA_FIELD,
                          f"cannot find candidate {i} {name!r} (after candidate {i - 1}) in the text")
        starts.append(pos)
        cursor = pos + len(name)
    if clean_text(para[:starts[0]]):
        raise bad_row("bad candidates", *where, PARA_FIELD, f"text before the first candidate {names[0]!r}")
    bounds = starts + [len(para)]
    return [(n, clean_text(para[bounds[i]:bounds[i + 1]])) for i, n in enumerate(names)]


def _find_all(text: str, sub: str, start: int) -> Iterator[int]:
    pos = text.find(sub, start)
    while pos >= 0:
        yield pos
        pos = text.find(sub, pos + 1)


def candidate_record(row: dict, where, settings: CaseSettings | None = None, label_threshold: int = 1) -> Record:
    """A candidate-layout case as a labelled pool: label 1 for the candidate named by the case's label."""
    settings = settings or CaseSettings()
    query, label = render_query(row, settings, where), case_label(row, settings, where)
    candidates = [(text, int(name == label)) for name, text in split_candidates(row, where)]
    return Record(query, [t for t, lab in candidates if lab >= label_threshold],
                  [t for t, lab in candidates if lab < label_threshold], candidates, source=f"{where[0]}:{where[1]}",
                  extra={"case_id": case_id(row, settings, where[1]), "label": label})


# --------------------------------------------------------------------------- files

def _rows(path: str, names: Sequence[str] = ()) -> Iterator[tuple[int, object]]:
    text = read_text(path)
    lower = path.lower().removesuffix(".gz")
    if lower.endswith((".csv", ".tsv")):
        return table_rows(text, path, "\t" if lower.endswith(".tsv") else ",", names)
    return json_array_rows(text, path) if text.lstrip()[:1] == "[" else jsonl_rows(text, path)


def _pick(row: dict, keys: Sequence[str], where) -> str:
    key = next((k for k in keys if k in row), None)
    if key is None:
        raise bad_row("missing field", *where, keys[0], f"expected one of {', '.join(keys)}")
    value = row[key]
    if not isinstance(value, str) or not clean_text(value):
        kind = "empty field" if isinstance(value, str) else "wrong type"
        raise bad_row(kind, *where, key, "expected a non-empty string")
    return clean_text(value)


def read_knowledge(path) -> dict[str, str]:
    """Knowledge base ``{name: text}`` in file order (formats: see the module docstring)."""
    path = os.fspath(path)
    text = read_text(path)
    entries: dict[str, str] = {}
    first_line: dict[str, int] = {}

    def add(name: str, body: str, line: int, field: str | None) -> None:
        if name in entries:
            raise DataError(f"duplicate knowledge entry {name!r} (first on line {first_line[name]})", path, line, field)
        entries[name], first_line[name] = body, line

    if text.lstrip()[:1] in ("{", "["):
        for line, row in (json_array_rows if text.lstrip()[:1] == "[" else jsonl_rows)(text, path):
            if isinstance(row, DataError):
                raise row
            if not isinstance(row, dict):
                raise bad_row("not an object", path, line, None, f"expected {{name, text}}, got {type(row).__name__}")
            if not entries and is_candidate_row(row):  # a case file in the candidate layout
                return knowledge_from_candidates(path)
            name_key = next((k for k in KNOWLEDGE_NAME_KEYS if k in row), KNOWLEDGE_NAME_KEYS[0])
            add(_pick(row, KNOWLEDGE_NAME_KEYS, (path, line)), _pick(row, KNOWLEDGE_TEXT_KEYS, (path, line)), line,
                name_key)
    else:
        for line, raw in enumerate(text.split("\n"), 1):
            if not raw.strip():
                continue
            name, tab, body = raw.partition("\t")
            name, body = clean_text(name), clean_text(body)
            if not entries and name.lower() in KNOWLEDGE_NAME_KEYS and body.lower() in KNOWLEDGE_TEXT_KEYS:
                continue  # header row
            if not tab:
                raise DataError("expected 'name<TAB>text'", path, line)
            if not name or not body:
                raise DataError(f"empty {'name' if not name else 'text'}", path, line, "name" if not name else "text")
            add(name, body, line, None)
    if not entries:
        raise DataError("no knowledge entries (empty file)", path)
    return entries


def knowledge_from_candidates(path) -> dict[str, str]:
    """Every candidate of a candidate-layout case file, as a knowledge base; a name whose text differs between
    cases is an error naming both lines."""
    path = os.fspath(path)
    entries: dict[str, str] = {}
    seen: dict[str, int] = {}
    for line, row in _rows(path):
        if isinstance(row, DataError):
            raise row
        if not isinstance(row, dict):
            raise bad_row("not an object", path, line, None, f"expected a JSON object, got {type(row).__name__}")
        for name, body in split_candidates(row, (path, line)):
            if name in entries and entries[name] != body:
                raise DataError(f"candidate {name!r} has another text than on line {seen[name]}", path, line,
                                PARA_FIELD)
            entries.setdefault(name, body)
            seen.setdefault(name, line)
    if not entries:
        raise DataError("no cases (empty file)", path)
    return entries


def write_knowledge_corpus(knowledge: dict[str, str], path) -> int:
    """The knowledge texts as a mining corpus, JSONL ``{"text", "name"}`` (``hfemb mine --corpus``)."""
    return write_jsonl(path, ({"text": body, "name": name} for name, body in knowledge.items()))


@dataclass
class CaseRecords:
    records: list[Record]
    path: str
    rows: int = 0
    missing_label: list[tuple[str, str]] = field(default_factory=list)  # (case id, label) without knowledge
    skipped: list[DataError] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # each record's label (knowledge name)

    def summary_lines(self, knowledge: dict[str, str] | None = None, first: int = 5) -> list[str]:
        lines = [f"read {self.path}: {self.rows} case rows -> {len(self.records)} records"]
        if knowledge is not None:
            lines.append(f"knowledge base: {len(knowledge)} entries; {len(set(self.labels))} of them are case labels")
        if self.missing_label:
            shown = ", ".join(f"{cid} ({label})" for cid, label in self.missing_label[:first])
            where = "in the knowledge base" if knowledge is not None else "among the case's candidates"
            lines.append(f"cases whose label is not {where}: {len(self.missing_label)} (not written; first: {shown})")
        if self.skipped:
            lines.append(f"skipped bad rows: {len(self.skipped)} (first: {self.skipped[0]})")
        return lines


def read_cases(path, *, knowledge: dict[str, str] | None = None, settings: CaseSettings | None = None,
               on_error: str = "raise") -> CaseRecords:
    """Case rows (JSONL, JSON array, CSV/TSV) -> records.

    With ``knowledge``: query -> the knowledge text of the case's label (one positive); cases whose label is
    not in ``knowledge`` are listed in ``missing_label``, not returned. Without: the rows must have the
    candidate layout and become labelled pools (cases whose label is not among their candidates are listed
    in ``missing_label``). ``on_error``: "raise" or "skip" (bad rows go to ``skipped``).
    """
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    settings = settings or CaseSettings()
    path = os.fspath(path)
    out = CaseRecords([], path)
    for line, row in _rows(path, [*settings.fields, settings.label_field]):
        out.rows += 1
        where = (path, line)
        try:
            row = object_row(row, path, line)
            if knowledge is None:
                if not is_candidate_row(row):
                    raise bad_row("missing field", path, line, OPTION_FIELD,
                                  "no knowledge base given and the case has no candidates (pass --knowledge FILE)")
                record = candidate_record(row, where, settings)
            else:
                query, label = render_query(row, settings, where), case_label(row, settings, where)
                cid = case_id(row, settings, line)
                record = Record(query, [knowledge[label]] if label in knowledge else [], source=f"{path}:{line}",
                                extra={"case_id": cid, "label": label})
        except DataError as exc:
            if on_error == "skip":
                out.skipped.append(exc)
                continue
            raise
        if not record.positives:
            out.missing_label.append((record.extra["case_id"], record.extra["label"]))
            continue
        out.records.append(record)
        out.labels.append(record.extra["label"])
    if out.rows == 0:
        raise DataError("no case rows (empty file)", path)
    return out
