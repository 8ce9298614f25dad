"""`hfemb mine`: BM25 hard/easy negative mining, and merging of sharded runs."""

from __future__ import annotations

import argparse
import dataclasses
from collections import Counter

from hfemb.data.formats import count_duplicates, read_corpus, read_records
from hfemb.data.records import column_map_from_flags
from hfemb.errors import ConfigError, DataError
from hfemb.io_utils import check_output

HELP = "mine hard/easy negatives by BM25 (jieba for Chinese), an embedding model, or both"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Mine BM25 negatives: each (query, positive) pair becomes one row {query, positive, negative: [...], "
        "mining: {kinds, bm25, positive_bm25}} with NUM_HARD hard negatives (sampled from the HARD_TOP_K "
        "best-ranked irrelevant documents) and the rest easy (from the EASY_BOTTOM_K worst-ranked). A report "
        "is printed and written to OUTPUT.report.json. Pool mode ranks each query's own labelled negatives; "
        "corpus mode ranks a corpus (default: all positives of the input, deduplicated), excluding the "
        "query's positives and their whitespace/punctuation-normalised duplicates. "
        "Merge shards with: hfemb mine --merge SHARD... --output FILE.")
    io = parser.add_argument_group("input and output")
    io.add_argument("--input", help="training data in any format hfemb reads (hfemb convert --help lists them)")
    io.add_argument("--output", required=True, help="mined rows, JSONL (hfemb format 1), written atomically")
    io.add_argument("--format", default="auto", help="input format (auto-detected by default)")
    io.add_argument("--query-columns", help="QA table: comma-separated columns joined (by a newline) into the query")
    io.add_argument("--positive-column", help="QA table: column holding the positive")
    io.add_argument("--label-threshold", type=int, default=1, help="labelled pools: label >= this is relevant")
    io.add_argument("--skip-bad", action="store_true", help="skip bad input rows (counted in the report) "
                    "instead of stopping at the first one")
    io.add_argument("--allow-empty", action="store_true",
                    help="write the output and exit 0 even when no row could be mined (default: exit 2 with the "
                         "reason, writing nothing)")
    io.add_argument("--merge", nargs="+", metavar="SHARD",
                    help="merge these shard outputs (each with its .report.json) into OUTPUT instead of mining")

    mode = parser.add_argument_group("what to rank")
    mode.add_argument("--mode", choices=("pool", "corpus"),
                      help="pool: rank each query's own labelled candidates; corpus: rank a corpus "
                           "(default: pool when the input has labelled candidates, else corpus)")
    mode.add_argument("--corpus", help="corpus mode: documents to rank, JSONL {\"text\"} or one per line "
                                       "(default: all positives of the input, deduplicated)")
    mode.add_argument("--tokenizer", choices=("jieba", "regex", "char"), default="jieba",
                      help="jieba: Chinese words; regex: lower-cased \\w+ words (English); char: characters")

    model = parser.add_argument_group("model-aware mining and teacher scores")
    model.add_argument("--scorer", choices=("bm25", "dense", "hybrid"), default="bm25",
                       help="rank candidates by BM25 (default), by an embedding model's cosine (dense), or by "
                            "reciprocal-rank fusion of both (hybrid); rows record both scores")
    model.add_argument("--model", help="embedding model for dense/hybrid: a local folder, a training output, an "
                                       "adapter or openai:MODEL@URL (embeddings cached like run_eval's)")
    model.add_argument("--teacher", help="write this model's cosine similarities to every row's positive and "
                                         "negatives (pos_scores / neg_scores, FlagEmbedding's names) for distillation")
    model.add_argument("--max-score-margin", type=float,
                       help="dense/hybrid: drop candidates the model scores above s(query, positive) - MARGIN")
    model.add_argument("--instruction", help="query instruction for --model and --teacher (default: each model's "
                                             "own prompt; \"\" for none)")
    model.add_argument("--embed-batch-size", type=int, default=32, help="texts per forward pass when embedding")
    model.add_argument("--device", help="device for --model / --teacher (default: cuda if available, else cpu)")

    sel = parser.add_argument_group("selection")
    sel.add_argument("--num-negatives", type=int, default=3,
                     help="negatives per row (training can draw more from the written pools: data.pool_negatives)")
    sel.add_argument("--num-hard", type=int, default=1, help="of which hard (the rest easy)")
    sel.add_argument("--hard-top-k", type=int, default=10, help="hard ones are sampled from this many top-ranked")
    sel.add_argument("--easy-bottom-k", type=int, default=10,
                     help="easy ones are sampled from this many bottom-ranked")
    sel.add_argument("--skip-top", type=int, default=0,
                     help="never use this many top-ranked candidates (likely unlabelled positives)")
    sel.add_argument("--max-relative-score", type=float,
                     help="drop candidates scoring above this fraction of the positive's own score (likely "
                          "false negatives; BM25, or the model's cosine with --scorer dense|hybrid, e.g. 0.95); "
                          "not applied when the positive scores <= 0")
    sel.add_argument("--seed", type=int, default=42, help="sampling seed (each query's generator: seed + index)")
    sel.add_argument("--no-candidates", action="store_true",
                     help="do not write each row's hard and easy pools (negative_candidates, from which training "
                          "redraws the row's negatives every epoch, or draws data.pool_negatives); smaller files")

    bm = parser.add_argument_group("BM25")
    bm.add_argument("--idf", choices=("okapi", "lucene"), default="okapi",
                    help="okapi: rank_bm25.BM25Okapi (epsilon floor for terms in > half the documents); "
                         "lucene: log(1 + (N - n + 0.5)/(n + 0.5)), never zero or negative")
    bm.add_argument("--idf-scope", choices=("all", "pool"), default="all",
                    help="pool mode: all = idf and average length from all pools together; pool = from each "
                         "query's own pool only (one BM25Okapi per query, as the reference recipe)")
    bm.add_argument("--k1", type=float, default=1.5, help="term-frequency saturation")
    bm.add_argument("--b", type=float, default=0.75, help="document-length normalisation")
    bm.add_argument("--epsilon", type=float, default=0.25, help="okapi: idf floor = epsilon * mean idf")

    run = parser.add_argument_group("running")
    run.add_argument("--num-shards", type=int, default=1, help="split the queries into this many contiguous "
                                                               "shards (merge the outputs with --merge)")
    run.add_argument("--shard-index", type=int, default=0, help="which shard to mine (0-based)")
    run.add_argument("--workers", type=int, help="jieba processes for large inputs (default: CPU count)")
    run.add_argument("--cache-dir", help="token cache (default: $HFEMB_CACHE/tokens or ~/.cache/hfemb/tokens)")
    run.add_argument("--no-cache", action="store_true", help="neither read nor write the token cache")


def run(args: argparse.Namespace) -> int:
    # lazy (numpy, scipy): not loaded for `hfemb mine --help`
    from hfemb.mining.mine import MiningConfig, merge_shards, mine, report_path, write_output

    if args.merge:
        if args.input:
            raise ConfigError("--merge and --input exclude each other")
        shards = [*args.merge, *(report_path(p) for p in args.merge)]
        check_output(args.output, inputs=shards, option="--output")
        check_output(report_path(args.output), inputs=shards, option="--output's report")
        report = merge_shards(args.merge, args.output)
        print(f"merged {len(args.merge)} shards: {report['rows_written']} rows -> {args.output}")
        return 0
    if not args.input:
        raise ConfigError("--input is required (or --merge SHARD...)")
    check_output(args.output, inputs=[args.input, args.corpus], option="--output")
    check_output(report_path(args.output), inputs=[args.input, args.corpus], option="--output's report")
    columns = column_map_from_flags(args.query_columns, args.positive_column)
    config = MiningConfig(  # validated before reading anything; the mode may depend on the data
        mode=args.mode or "corpus", tokenizer=args.tokenizer, k1=args.k1, b=args.b, epsilon=args.epsilon,
        idf=args.idf, idf_scope=args.idf_scope, hard_top_k=args.hard_top_k, easy_bottom_k=args.easy_bottom_k,
        num_negatives=args.num_negatives, num_hard=args.num_hard, skip_top=args.skip_top,
        max_relative_score=args.max_relative_score, seed=args.seed, num_shards=args.num_shards,
        shard_index=args.shard_index, cache_dir=args.cache_dir, workers=args.workers, use_cache=not args.no_cache,
        scorer=args.scorer, model=args.model, teacher=args.teacher, max_score_margin=args.max_score_margin,
        instruction=args.instruction, embed_batch_size=args.embed_batch_size, device=args.device,
        candidates=not args.no_candidates)
    data = read_records(args.input, fmt=args.format, columns=columns, label_threshold=args.label_threshold,
                        on_error="skip" if args.skip_bad else "raise")
    if args.mode is None and any(r.candidates for r in data.records):
        config = dataclasses.replace(config, mode="pool")
    if args.corpus and config.mode == "pool":
        raise ConfigError("--corpus is for corpus mode; this input is mined in pool mode (pass --mode corpus)")
    corpus = read_corpus(args.corpus) if args.corpus else None
    result = mine(data.records, config, corpus=corpus)
    result.report["input"] = {
        "path": args.input, "format": data.format, "rows": data.rows, "records": len(data.records),
        "skipped": len(data.skipped),
        "skipped_by_kind": dict(Counter(getattr(e, "kind", "bad row") for e in data.skipped)),
        "duplicate_rows": count_duplicates(data.records),
        "corpus": args.corpus,
    }
    if result.report["rows_written"] == 0 and not args.allow_empty:
        raise DataError(f"no row could be mined, nothing written: {empty_reason(result.report, config)} "
                        "(--allow-empty writes the empty output and exits 0)", args.input)
    write_output(result, args.output)
    for line in summary_lines(result.report):
        print(line)
    print(f"wrote {args.output} and {report_path(args.output)}")
    return 0


def empty_reason(report: dict, config) -> str:
    """Why mining produced no row, from its report."""
    dropped = report["rows_dropped"]
    reasons = []
    if report["queries"] == 0:
        reasons.append("this shard has no query" if report["shard"]["num_shards"] > 1 else "no query")
    if report["queries_without_positive"]:
        reasons.append(f"{report['queries_without_positive']} of {report['queries']} queries have no positive")
    if dropped.get("too_few_negatives"):
        reasons.append(f"{dropped['too_few_negatives']} rows lack {config.num_negatives} negatives among the "
                       f"{report['documents']} documents (each needs documents other than its query's positives "
                       "and their duplicates; the input may have a single row, or all rows alike)")
    if dropped.get("max_relative_score"):
        reasons.append(f"{dropped['max_relative_score']} rows lost their candidates to --max-relative-score"
                       + (" / --max-score-margin" if config.max_score_margin is not None else ""))
    return "; ".join(reasons) or "every row was dropped"


def summary_lines(report: dict) -> list[str]:
    """The report in a few human-readable lines."""
    def kv(d: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in d.items())

    tok = report["tokenization"]
    lines = []
    if "input" in report:
        inp = report["input"]
        lines.append(f"read {inp['records']} records from {inp['path']} ({inp['format']}; "
                     f"{inp['skipped']} bad rows skipped; {inp.get('duplicate_rows', 0)} exact duplicate rows)")
    shard = report["shard"]
    lines += [
        f"{report['mode']} mode over {report['documents']} documents; shard {shard['shard_index']}/"
        f"{shard['num_shards']}: queries {shard['query_start']}..{shard['query_end'] - 1}",
        f"{report['queries']} queries -> {report['rows_written']} rows; dropped rows: {kv(report['rows_dropped'])}; "
        f"queries without positive {report['queries_without_positive']}",
        f"negatives: {kv(report['negatives'])}; candidates over max-relative-score: "
        f"{report['score_filtered_candidates']}",
        f"excluded from negatives: {kv(report['excluded'])}",
        *([f"scorer {report['scorer']}: {report['embedding']['texts']} texts embedded "
           f"({report['embedding']['texts_from_cache']} from cache) in {report['embedding']['seconds']} s"]
          if report.get("embedding") else []),
        *([f"teacher scores: {report['teacher']['texts']} texts ({report['teacher'].get('texts_from_cache', 0)} "
           f"from cache)"] if report.get("teacher") else []),
        f"tokenisation {tok['seconds']} s ({tok['texts']} texts, {tok['cache_hits']} cache hits, "
        f"{tok['cache_misses']} misses), index {report['index_seconds']} s, scoring {report['scoring_seconds']} s, "
        f"selection {report['selection_seconds']} s; {report['queries_per_second']} queries/s overall",
    ]
    return lines
