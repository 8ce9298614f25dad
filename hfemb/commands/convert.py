"""`hfemb convert`: read any supported data file, write it as hfemb / FlagEmbedding / ms-swift training rows."""

from __future__ import annotations

import argparse
from collections import Counter

from hfemb.data import FORMATS, READ_FORMATS, ColumnMap, read_records, write_records
from hfemb.errors import ConfigError, DataError

HELP = "convert training data between formats (hfemb, FlagEmbedding, ms-swift)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, metavar="FILE",
                        help="data file: JSONL, JSON array, CSV/TSV or QA-block text, optionally .gz")
    parser.add_argument("--output", required=True, metavar="FILE",
                        help="file to write (JSONL; a JSON array if it ends in .json; gzip if .gz). Written "
                             "atomically: on any error it is not created and an existing file stays unchanged")
    parser.add_argument("--from", dest="from_format", default="auto", choices=("auto",) + READ_FORMATS,
                        help="input format; 'auto' detects it from the keys of the first valid row")
    parser.add_argument("--to", dest="to_format", default="hfemb", choices=FORMATS,
                        help="output format: hfemb {query,positive,negative} and swift {query,response,"
                             "rejected_response} write one row per positive, flagembedding {query,pos,neg} one "
                             "row per query")
    parser.add_argument("--query-columns", metavar="A,B",
                        help="QA table: comma-separated columns joined (with --query-sep) into the query")
    parser.add_argument("--positive-column", metavar="C", help="QA table: column holding the positive answer")
    parser.add_argument("--query-sep", default="\\n",
                        help="QA table: joiner of the query columns (\\n and \\t are read as newline and tab)")
    parser.add_argument("--label-threshold", type=int, default=1, metavar="N",
                        help="labelled pools/pairs: a candidate is a positive when its label >= N (KUAKE-QQR: 2)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip bad rows (counted by reason) instead of stopping at the first one")
    parser.add_argument("--bad-label", default="error", choices=("error", "skip"),
                        help="rows whose label is not an integer (e.g. 'NA'): 'error' treats them as bad rows, "
                             "'skip' always skips them (counted)")
    parser.add_argument("--extra", default="auto", choices=("auto", "all", "none"),
                        help="input keys beyond the format's own (mining info, ids, ...) to write: 'auto' = all "
                             "for hfemb, FlagEmbedding's optional keys (prompt, type, pos_scores, neg_scores) for "
                             "flagembedding, none for swift; 'all'; 'none'")


def _column_map(args) -> ColumnMap | None:
    if not args.query_columns and not args.positive_column:
        return None
    if not (args.query_columns and args.positive_column):
        raise ConfigError("--query-columns and --positive-column go together")
    query = [c.strip() for c in args.query_columns.split(",") if c.strip()]
    if not query:
        raise ConfigError("--query-columns names no column")
    sep = args.query_sep.replace("\\n", "\n").replace("\\t", "\t")
    return ColumnMap(query=query, positive=args.positive_column.strip(), sep=sep)


def run(args) -> int:
    result = read_records(args.input, fmt=args.from_format, columns=_column_map(args),
                          on_error="skip" if args.skip_bad else "raise", label_threshold=args.label_threshold,
                          bad_label=args.bad_label)
    records = result.records
    without_positive = sum(1 for r in records if not r.positives)
    print(f"read {result.path}: {result.rows} rows, format {result.format}")
    print(f"records: {len(records)}" + (f" ({without_positive} without a positive: not written)"
                                       if without_positive else ""))
    print(f"skipped: {len(result.skipped)} bad rows")
    first: dict[str, str] = {}
    for err in result.skipped:
        first.setdefault(getattr(err, "kind", "bad row"), str(err))
    for kind, count in Counter(getattr(e, "kind", "bad row") for e in result.skipped).most_common():
        print(f"  {kind}: {count} (first: {first[kind]})")
    if not records or not any(r.positives for r in records):
        raise DataError("no record has a positive: nothing to write (for labelled pools/pairs check "
                        "--label-threshold)", result.path)
    written = write_records(records, args.output, args.to_format, extra=args.extra)
    print(f"wrote {args.output}: {written} rows ({args.to_format})")
    return 0
