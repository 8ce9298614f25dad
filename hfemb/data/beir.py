"""Retrieval sets: a corpus, queries and graded relevance judgements (qrels), from a BEIR folder or hfemb data.

BEIR layout (``read_beir``): ``corpus.jsonl`` rows ``{"_id", "title", "text"}``, ``queries.jsonl`` rows
``{"_id", "text"}``, ``qrels/{split}.tsv`` with the header ``query-id corpus-id score``. As in BEIR's
``GenericDataLoader``, a document's text is ``title + " " + text`` when it has a (non-empty) title, and only
queries that appear in the split's qrels are kept. hfemb's own data (``retrieval_set_from_records``): queries
with their positives (graded ``candidates`` when a record has them) over a corpus file, or over the documents
of the records themselves. Bad input stops with one ``DataError`` naming the file, line and field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hfemb.errors import DataError

BEIR_SPLITS = ("train", "dev", "test")


@dataclass
class RetrievalSet:
    """Documents and queries by id, and ``qrels[query_id] = {doc_id: grade}`` (grades as given, may be 0)."""

    doc_ids: list[str]
    doc_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]
    stats: dict = field(default_factory=dict)

    def subset(self, query_ids: list[str], part: str) -> RetrievalSet:
        """The same corpus with only ``query_ids`` (in that order)."""
        pos = {q: i for i, q in enumerate(self.query_ids)}
        stats = {**self.stats, "part": part, "queries": len(query_ids)}
        return RetrievalSet(self.doc_ids, self.doc_texts, list(query_ids), [self.query_texts[pos[q]] for q in query_ids],
                            {q: self.qrels[q] for q in query_ids}, stats)


def is_beir_folder(path) -> bool:
    """A folder holding ``corpus.jsonl`` and ``queries.jsonl``."""
    p = Path(path)
    return p.is_dir() and (p / "corpus.jsonl").is_file() and (p / "queries.jsonl").is_file()


def _jsonl_objects(path: Path, required: tuple[str, ...]):
    """(line, row) for each non-blank line of a JSONL file; a bad line raises ``DataError`` at file:line:field."""
    try:
        fh = open(path, encoding="utf-8-sig")
    except OSError as exc:
        raise DataError(f"cannot read: {exc.strerror}", str(path)) from None
    with fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(f"not valid JSON: {exc}", str(path), line_no) from None
            if not isinstance(row, dict):
                raise DataError(f"expected a JSON object, got {type(row).__name__}", str(path), line_no)
            for key in required:
                if key not in row or row[key] is None:
                    raise DataError("missing", str(path), line_no, key)
            yield line_no, row


def _id(row: dict, path: Path, line: int) -> str:
    value = row["_id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
        raise DataError(f"expected a non-empty string or integer id, got {value!r}", str(path), line, "_id")
    return str(value)


def _str_field(row: dict, key: str, path: Path, line: int) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", str(path), line, key)
    return value


def read_beir_corpus(path) -> tuple[list[str], list[str]]:
    """(ids, texts) of a BEIR ``corpus.jsonl``; text = ``title + " " + text`` when the title is non-empty."""
    path = Path(path)
    ids, texts, seen = [], [], {}
    for line, row in _jsonl_objects(path, ("_id", "text")):
        doc_id = _id(row, path, line)
        if doc_id in seen:
            raise DataError(f"duplicate id {doc_id!r} (first on line {seen[doc_id]})", str(path), line, "_id")
        seen[doc_id] = line
        title, text = _str_field(row, "title", path, line).strip(), _str_field(row, "text", path, line).strip()
        joined = f"{title} {text}".strip() if title else text
        if not joined:
            raise DataError("empty document (no title and no text)", str(path), line, "text")
        ids.append(doc_id)
        texts.append(joined)
    if not ids:
        raise DataError("no documents (empty file)", str(path))
    return ids, texts


def read_beir_queries(path) -> dict[str, str]:
    path = Path(path)
    queries: dict[str, str] = {}
    lines: dict[str, int] = {}
    for line, row in _jsonl_objects(path, ("_id", "text")):
        qid = _id(row, path, line)
        if qid in queries:
            raise DataError(f"duplicate id {qid!r} (first on line {lines[qid]})", str(path), line, "_id")
        text = _str_field(row, "text", path, line).strip()
        if not text:
            raise DataError("empty query", str(path), line, "text")
        queries[qid], lines[qid] = text, line
    return queries


def read_qrels(path) -> dict[str, dict[str, int]]:
    """``query-id<TAB>corpus-id<TAB>score`` rows after a header line (BEIR); integer scores."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise DataError(f"cannot read: {exc.strerror}", str(path)) from None
    qrels: dict[str, dict[str, int]] = {}
    names = ("query-id", "corpus-id", "score")
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        parts = line.rstrip("\r").split("\t")
        if line_no == 1 and parts[0].strip().lower() in ("query-id", "query_id", "qid"):
            continue  # the header
        if len(parts) != 3:
            raise DataError(f"expected 3 tab-separated fields (query-id, corpus-id, score), got {len(parts)}",
                            str(path), line_no)
        qid, did, score = (p.strip() for p in parts)
        for name, value in zip(names, (qid, did, score)):
            if not value:
                raise DataError("empty", str(path), line_no, name)
        try:
            grade = int(score)
        except ValueError:
            try:
                grade = float(score)
            except ValueError:
                grade = None
            if grade is None or grade != int(grade):
                raise DataError(f"expected an integer relevance grade, got {score!r}", str(path), line_no,
                                "score") from None
            grade = int(grade)
        qrels.setdefault(qid, {})[did] = grade
    if not qrels:
        raise DataError("no judgements (empty file)", str(path))
    return qrels


def read_beir(folder, split: str = "test") -> RetrievalSet:
    """The BEIR folder's corpus, and the queries judged in ``qrels/{split}.tsv`` (in qrels order)."""
    folder = Path(folder)
    if not is_beir_folder(folder):
        raise DataError("not a BEIR folder (needs corpus.jsonl and queries.jsonl)", str(folder))
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        have = sorted(p.stem for p in (folder / "qrels").glob("*.tsv")) if (folder / "qrels").is_dir() else []
        raise DataError(f"no qrels/{split}.tsv (splits here: {', '.join(have) or 'none'})", str(folder))
    doc_ids, doc_texts = read_beir_corpus(folder / "corpus.jsonl")
    queries = read_beir_queries(folder / "queries.jsonl")
    qrels = read_qrels(qrels_path)
    unknown_q = [q for q in qrels if q not in queries]
    if unknown_q:
        raise DataError(f"query-id {unknown_q[0]!r} is not in queries.jsonl ({len(unknown_q)} such ids)",
                        str(qrels_path), None, "query-id")
    known = set(doc_ids)
    unknown_docs = sum(1 for judged in qrels.values() for d in judged if d not in known)
    stats = {"path": str(folder), "format": "beir", "split": split, "documents": len(doc_ids),
             "queries": len(qrels), "judgements": sum(len(j) for j in qrels.values()),
             "judged_documents_not_in_corpus": unknown_docs}
    return RetrievalSet(doc_ids, doc_texts, list(qrels), [queries[q] for q in qrels], qrels, stats)


def retrieval_set_from_records(records, corpus_texts: list[str] | None = None, *, path: str = "",
                               corpus_path: str | None = None) -> RetrievalSet:
    """Queries with their positives (grade 1) or graded ``candidates`` as a retrieval set.

    The corpus is ``corpus_texts`` (e.g. ``hfemb.data.formats.read_corpus``) plus any judged document missing
    from it (counted), or, without a corpus, every document of the records. Records sharing a query merge;
    a document judged twice keeps its highest grade. Document ids are ``d<index>``, query ids ``q<index>``.
    """
    doc_pos: dict[str, int] = {}
    for text in corpus_texts or []:
        doc_pos.setdefault(text, len(doc_pos))
    from_corpus = len(doc_pos)
    q_pos: dict[str, int] = {}
    judged: list[dict[int, int]] = []
    for rec in records:
        items = rec.candidates or [(t, 1) for t in rec.positives] + [(t, 0) for t in rec.negatives]
        qi = q_pos.setdefault(rec.query, len(q_pos))
        if qi == len(judged):
            judged.append({})
        for text, grade in items:
            if corpus_texts is not None and int(grade) <= 0 and text not in doc_pos:
                continue  # an unjudged-as-relevant document outside the corpus: not part of the search space
            di = doc_pos.setdefault(text, len(doc_pos))
            judged[qi][di] = max(int(grade), judged[qi].get(di, int(grade)))
    doc_ids = [f"d{i}" for i in range(len(doc_pos))]
    query_ids = [f"q{i}" for i in range(len(q_pos))]
    qrels = {query_ids[qi]: {doc_ids[di]: g for di, g in j.items()} for qi, j in enumerate(judged)}
    stats = {"path": str(path), "format": "records", "corpus": corpus_path, "documents": len(doc_pos),
             "documents_from_corpus_file": from_corpus if corpus_texts is not None else None,
             "judged_documents_added_to_corpus": len(doc_pos) - from_corpus if corpus_texts is not None else None,
             "queries": len(q_pos), "judgements": sum(len(j) for j in judged)}
    return RetrievalSet(doc_ids, list(doc_pos), query_ids, list(q_pos), qrels, stats)

