"""`hfemb convert`: read any supported data file, write it as hfemb / FlagEmbedding / ms-swift training rows."""

from __future__ import annotations

import argparse
from collections import Counter

from hfemb.data import cases
from hfemb.data.formats import FORMATS, READ_FORMATS, count_duplicates, read_records, write_records
from hfemb.data.records import column_map_from_flags
from hfemb.errors import ConfigError, DataError
from hfemb.io_utils import check_output

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
    cases = parser.add_argument_group(
        "case records (hfemb.data.cases)",
        "Case records with a label (TCM-SD: chief_complaint, medical_history, FDMR, norm_syndrome) become "
        "rows query = the case fields, one 'name：value' line each (empty fields skipped), positive = the "
        "knowledge text of the case's label. Cases whose label is not in the knowledge base are counted and "
        "not written. Without --knowledge the cases must carry their own candidates (knowledge_option/"
        "knowledge_para): each becomes a labelled pool, the other candidates its negatives.")
    cases.add_argument("--knowledge", metavar="FILE",
                       help="knowledge base: TSV 'name<TAB>text' lines or JSONL {name|syndrome|label, "
                            "text|knowledge|content} (or a case file with knowledge_option/knowledge_para: all its "
                            "candidates); --input is then read as case records")
    cases.add_argument("--query-fields", metavar="F[=NAME],...",
                       help="case fields of the query, in order, each optionally with its display name "
                            "(default chief_complaint=主诉,medical_history=现病史,FDMR=四诊摘要)")
    cases.add_argument("--label-field", metavar="F", help="case field naming its knowledge entry (default norm_syndrome)")
    cases.add_argument("--query-template", metavar="T",
                       help="the whole query as a Python format string over case fields, \\n for a newline, e.g. "
                            "'主诉：{chief_complaint}\\n现病史：{medical_history}'; a line whose fields are all "
                            "empty is dropped (replaces --query-fields)")
    cases.add_argument("--corpus-output", metavar="FILE",
                       help="with --knowledge: also write the knowledge texts as JSONL {text, name}, the corpus "
                            "for `hfemb mine --mode corpus --corpus FILE`")


def _case_mode(args) -> bool:
    return any(getattr(args, k, None) for k in ("knowledge", "query_fields", "label_field", "query_template",
                                                   "corpus_output"))


def _run_cases(args) -> int:
    if args.query_columns or args.positive_column or args.from_format != "auto":
        raise ConfigError("case records (--knowledge/--query-fields/--label-field/--query-template) exclude "
                          "--query-columns, --positive-column and --from")
    if args.corpus_output and not args.knowledge:
        raise ConfigError("--corpus-output writes the knowledge base: it needs --knowledge")
    settings = cases.case_settings(args.query_fields, args.label_field, args.query_template)
    knowledge = cases.read_knowledge(args.knowledge) if args.knowledge else None
    result = cases.read_cases(args.input, knowledge=knowledge, settings=settings,
                              on_error="skip" if args.skip_bad else "raise")
    for line in result.summary_lines(knowledge):
        print(line)
    if not result.records:
        raise DataError("no case could be written (see the counts above)", result.path)
    written = write_records(result.records, args.output, args.to_format, extra=args.extra)
    print(f"wrote {args.output}: {written} rows ({args.to_format})")
    if args.corpus_output:
        n = cases.write_knowledge_corpus(knowledge, args.corpus_output)
        print(f"wrote {args.corpus_output}: {n} knowledge texts (mining corpus)")
    return 0


def check_outputs(args) -> None:
    """--output (and --corpus-output) are writable and none of the inputs, before anything is read."""
    inputs = [args.input, getattr(args, "knowledge", None)]
    check_output(args.output, inputs=inputs, option="--output")
    if getattr(args, "corpus_output", None):
        check_output(args.corpus_output, inputs=inputs + [args.output], option="--corpus-output")


def run(args) -> int:
    check_outputs(args)
    if _case_mode(args):
        return _run_cases(args)
    result = read_records(args.input, fmt=args.from_format, columns=column_map_from_flags(args.query_columns, args.positive_column, args.query_sep),
                          on_error="skip" if args.skip_bad else "raise", label_threshold=args.label_threshold,
                          bad_label=args.bad_label)
    records = result.records
    without_positive = sum(1 for r in records if not r.positives)
    print(f"read {result.path}: {result.rows} rows, format {result.format}")
    print(f"records: {len(records)}" + (f" ({without_positive} without a positive: not written)"
                                       if without_positive else ""))
    print(f"skipped: {len(result.skipped)} bad rows")
    duplicates = count_duplicates(records)
    if duplicates:
        print(f"duplicates: {duplicates} rows repeat an earlier row exactly (written as they are)")
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
