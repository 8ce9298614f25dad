"""`hfemb split`: cut a labelled eval file into dev and test by query (seeded), written as eval pools."""

from __future__ import annotations

import argparse

from hfemb.errors import ConfigError
from hfemb.io_utils import check_output, same_file, write_json, write_jsonl

HELP = "split a labelled eval file into dev/test by query"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="labelled file (any format `hfemb eval --data` reads)")
    parser.add_argument("--dev-out", required=True, metavar="FILE", help="dev file to write")
    parser.add_argument("--test-out", required=True, metavar="FILE", help="test file to write")
    parser.add_argument("--dev-fraction", type=float, default=0.5, help="fraction of the queries that go to dev")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", dest="data_format", default="auto", help="input format (default auto-detect)")
    parser.add_argument("--label-threshold", type=int, default=1, help="a pair is relevant when label >= N")
    parser.add_argument("--skip-bad", action="store_true", help="skip bad rows (counted) instead of stopping")
    parser.add_argument("--bad-label", choices=("error", "skip"), default="error",
                        help="rows with a non-integer label such as 'NA'")


def write_pools(path: str, rows: list[dict]) -> None:
    """JSONL, or a JSON array when the name ends in .json; atomic."""
    if str(path).endswith(".json"):
        write_json(path, rows)
    else:
        write_jsonl(path, rows)


def run(args) -> int:
    # lazy (numpy): not loaded for `hfemb split --help`
    from hfemb.data.splits import pool_rows_by_query, split_by_query
    from hfemb.evaluation.evaluate import read_eval_records
    from hfemb.evaluation.settings import EvalSettings

    if same_file(args.dev_out, args.test_out):
        raise ConfigError("--dev-out and --test-out must differ")
    check_output(args.dev_out, inputs=[args.input], option="--dev-out")
    check_output(args.test_out, inputs=[args.input], option="--test-out")
    settings = EvalSettings(data_format=args.data_format, on_error="skip" if args.skip_bad else "raise",
                            bad_label=args.bad_label, label_threshold=args.label_threshold)
    result = read_eval_records(args.input, settings)
    dev, test = split_by_query(result.records, args.dev_fraction, args.seed)
    dev_rows, test_rows = pool_rows_by_query(dev), pool_rows_by_query(test)
    write_pools(args.dev_out, dev_rows)
    write_pools(args.test_out, test_rows)
    print(f"{args.input}: {len(dev_rows) + len(test_rows)} queries -> dev {args.dev_out} ({len(dev_rows)} queries, "
          f"{sum(len(r['documents']) for r in dev_rows)} pairs), test {args.test_out} ({len(test_rows)} queries, "
          f"{sum(len(r['documents']) for r in test_rows)} pairs); seed {args.seed}"
          + (f"; {len(result.skipped)} bad rows skipped" if result.skipped else ""))
    return 0
