"""Benchmark: jieba tokenisation (cold/cached), hfemb sparse BM25 vs rank_bm25.BM25Okapi, full mining run.

    python bench/bench_mining.py [--data ../shared/data/zh_medical_qa] [--queries 200]

Corpus A: all answers (7,644 CSV + 4,048 short-txt = 11,692, duplicates kept). Corpus B (>= 20k documents):
A plus every question (CSV title+ask and short-txt question lines) = 23,384 real texts. Queries: a seeded
sample of the CSV's title+ask. rank-bm25 scores each query with ``get_scores`` (pure Python, slow); hfemb
scores the same queries with ``BM25.top_k`` (sparse product in batches + argpartition, query encoding
included) and, unbatched, with ``BM25.get_scores`` (best of 3 runs each; rank-bm25 runs once, ~1 minute).
Rankings are compared tie-aware: the top-10 score lists
must agree to 1e-6 and every document scoring strictly above the 10th score must be in both top-10s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rank_bm25 import BM25Okapi  # noqa: E402

from hfemb.mining.bm25 import BM25, TokenizeStats, tokenize  # noqa: E402
from hfemb.data.formats import read_records  # noqa: E402
from hfemb.mining.mine import MiningConfig, mine  # noqa: E402


def best_of(repeats, fn):
    """(fastest wall time, result) of a few runs: the machine is shared, hfemb's runs are short."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def compare(name, docs_tokens, query_tokens, k=10):
    t0 = time.perf_counter()
    ref = BM25Okapi(docs_tokens)
    ref_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = BM25(docs_tokens)
    our_build = time.perf_counter() - t0

    t0 = time.perf_counter()
    ref_scores = [ref.get_scores(q) for q in query_tokens]
    ref_time = time.perf_counter() - t0
    ref_top = [np.argsort(-s, kind="stable")[:k] for s in ref_scores]

    top_time, (ids, scores) = best_of(3, lambda: ours.top_k(query_tokens, k))
    single_time, single = best_of(3, lambda: [ours.get_scores(q) for q in query_tokens])

    max_diff = max(float(np.abs(a - b).max()) for a, b in zip(ref_scores, single))
    exact = tie_ok = 0
    for full, r_ids, o_ids, o_scores in zip(ref_scores, ref_top, ids, scores):
        exact += list(r_ids) == list(o_ids)
        best = full[r_ids]
        above = set(np.flatnonzero(full > best[-1] + 1e-9).tolist())
        tie_ok += bool(np.allclose(best, o_scores, atol=1e-6) and np.allclose(full[o_ids], o_scores, atol=1e-6)
                       and above <= set(o_ids.tolist()) and above <= set(r_ids.tolist()))
    n = len(query_tokens)
    return {
        "corpus": name, "docs": len(docs_tokens), "vocab": len(ours.vocab), "queries": n,
        "ref_build_s": ref_build, "our_build_s": our_build,
        "ref_qps": n / ref_time, "top_k_qps": n / top_time, "single_qps": n / single_time,
        "ratio_top_k": ref_time / top_time, "ratio_single": ref_time / single_time,
        "max_abs_diff": max_diff, "top10_identical": exact, "top10_tie_aware": tie_ok,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/zh_medical_qa"))
    parser.add_argument("--queries", type=int, default=200, help="queries scored by rank-bm25 (slow)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = Path(args.data)
    csv_records = read_records(data / "internal_medicine_qa.csv").records
    short_records = read_records(data / "internal_medicine_qa_short.txt", fmt="qa_blocks").records
    answers = [r.positives[0] for r in csv_records + short_records]
    questions = [r.query for r in csv_records + short_records]
    print(f"data: {len(csv_records)} CSV + {len(short_records)} short-txt pairs from {data}")
    print(f"cpus: {os.cpu_count()}, python {sys.version.split()[0]}")

    with tempfile.TemporaryDirectory() as cache:
        texts = answers + questions
        cold_serial = TokenizeStats()
        tokenize(texts, "jieba", use_cache=False, workers=1, stats=cold_serial)
        cold = TokenizeStats()
        tokens = tokenize(texts, "jieba", cache_dir=cache, stats=cold)
        warm = TokenizeStats()
        tokens_again = tokenize(texts, "jieba", cache_dir=cache, stats=warm)
        assert warm.cache_hit and tokens_again == tokens
        print(f"jieba on {len(texts)} texts: cold 1 process {cold_serial.seconds:.2f} s, cold {cold.workers} "
              f"processes {cold.seconds:.2f} s, cached {warm.seconds:.3f} s")

        answer_tokens, question_tokens = tokens[:len(answers)], tokens[len(answers):]
        rng = np.random.default_rng(args.seed)
        sample = rng.choice(len(csv_records), size=min(args.queries, len(csv_records)), replace=False)
        query_tokens = [question_tokens[i] for i in sample]
        results = [compare("answers", answer_tokens, query_tokens),
                   compare("answers+questions", answer_tokens + question_tokens, query_tokens)]
        for r in results:
            print(f"{r['corpus']}: {r['docs']} docs, vocab {r['vocab']}; build rank-bm25 {r['ref_build_s']:.2f} s, "
                  f"hfemb {r['our_build_s']:.2f} s; rank-bm25 {r['ref_qps']:.1f} q/s, hfemb top_k "
                  f"{r['top_k_qps']:.0f} q/s ({r['ratio_top_k']:.0f}x), hfemb get_scores {r['single_qps']:.0f} q/s "
                  f"({r['ratio_single']:.0f}x); max |score diff| {r['max_abs_diff']:.1e}; top-10 identical "
                  f"{r['top10_identical']}/{r['queries']}, tie-aware agree {r['top10_tie_aware']}/{r['queries']}")

        records = csv_records + short_records
        t0 = time.perf_counter()
        result = mine(records, MiningConfig(cache_dir=cache))
        mine_time = time.perf_counter() - t0
        rep = result.report
        print(f"mine (corpus mode, {rep['queries']} queries over {rep['documents']} deduplicated answers): "
              f"{mine_time:.1f} s total; tokenisation {rep['tokenization']['seconds']} s "
              f"({rep['tokenization']['cache_hits']} cache hits), index {rep['index_seconds']} s, scoring "
              f"{rep['scoring_seconds']} s, selection {rep['selection_seconds']} s; {rep['rows_written']} rows, "
              f"dropped {rep['rows_dropped']}, excluded {rep['excluded']}")
        result2 = mine(records, MiningConfig(cache_dir=cache))
        assert result2.rows == result.rows
        rep2 = result2.report

    print("\n| measure | value |\n|---|---|")
    print(f"| jieba, {len(texts):,} texts, cold (1 / {cold.workers} processes) | {cold_serial.seconds:.1f} s / "
          f"{cold.seconds:.1f} s |")
    print(f"| jieba, same texts, from the token cache | {warm.seconds:.2f} s |")
    for r in results:
        print(f"| BM25 on {r['docs']:,} docs: rank-bm25 `get_scores` | {r['ref_qps']:.1f} queries/s |")
        print(f"| BM25 on {r['docs']:,} docs: hfemb `top_k` (batched) / `get_scores` | {r['top_k_qps']:,.0f} / "
              f"{r['single_qps']:,.0f} queries/s (**{r['ratio_top_k']:.0f}x** / {r['ratio_single']:.0f}x) |")
        print(f"| top-10 agreement ({r['queries']} queries; tie-aware) | {r['top10_tie_aware']}/{r['queries']} "
              f"(max score diff {r['max_abs_diff']:.0e}) |")
    print(f"| `mine`, {rep['queries']:,} queries x {rep['documents']:,} answers (cold / cached tokens) | "
          f"{mine_time:.1f} s / {rep2['total_seconds']:.1f} s ({rep2['queries_per_second']:,.0f} queries/s) |")
    print("\nCommand: `python bench/bench_mining.py` (queries = title+ask of internal_medicine_qa.csv; "
          f"{len(query_tokens)} sampled for the rank-bm25 comparison).")


if __name__ == "__main__":
    main()
