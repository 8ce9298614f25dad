"""Mining at corpus scale: `hfemb.mining.mine.mine` (corpus mode, jieba, the default 1 hard + 2 easy recipe) on
synthetic Chinese corpora up to 1M documents: time, peak memory, per-query cost.

    python bench/bench_mining_scale.py [--sizes 100000 1000000] [--queries 1000]

Corpus of N documents: the 11,692 real answers of ../shared/data/zh_medical_qa (CSV + short txt), then
distinct synthetic documents, each 2-4 sentences (uniform) drawn with replacement, seeded, from the 19.8k
distinct sentences of those answers (split after 。！？!?；;) -- about as long as a real answer (~150
characters) and with its vocabulary. Queries: a seeded sample of the real questions; their own answers are
in the corpus (excluded as positives, as in a real run).

Each size runs in a fresh subprocess, twice: cold (parallel jieba, writes a fresh token cache) and warm
(reads it). Peak memory is that process's resident-set high-water mark (``ru_maxrss``; the jieba worker
processes are reported apart). Token lists share one ``str`` per distinct token (``hfemb.mining.bm25``): without
that, 1M documents needed ~14 GB (1.5 GB measured at 100k, 4.3 GB at 300k).
Scoring is sparse: each block of queries is a (queries x vocabulary) sparse matrix times the (vocabulary x
documents) postings, densified one block at a time (``_SCORE_BLOCK`` floats, ~32 MB, i.e. 4 queries per
block at 1M documents) -- never the whole queries x documents matrix (8 GB for 1,000 queries at 1M
documents). Progress goes to stderr with timestamps (run it in the background with a log).
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (also puts the repository on sys.path)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "zh_medical_qa"
SENTENCE_END = re.compile(r"(?<=[。！？!?；;])")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def real_records(data: Path):
    from hfemb.data.formats import read_records

    return (read_records(str(data / "internal_medicine_qa.csv")).records
            + read_records(str(data / "internal_medicine_qa_short.txt")).records)


def build_corpus(records, size: int, seed: int = 0) -> list[str]:
    """The distinct real answers, then distinct synthetic documents of 2-4 random real sentences, up to ``size``
    documents (mining deduplicates its corpus, so duplicates would not count)."""
    answers = list(dict.fromkeys(p for r in records for p in r.positives))
    sentences = sorted({s for a in answers for s in SENTENCE_END.split(a) if s.strip()})
    rng = np.random.default_rng(seed)
    docs = dict.fromkeys(answers[:size])
    while len(docs) < size:
        missing = size - len(docs)
        counts = rng.integers(2, 5, size=missing)
        picks = rng.integers(0, len(sentences), size=int(counts.sum())).tolist()
        ends = np.cumsum(counts).tolist()
        for start, end in zip([0] + ends[:-1], ends):
            docs.setdefault("".join(sentences[j] for j in picks[start:end]))
    return list(docs)[:size]


def measure(size: int, n_queries: int, workers: int, cache_dir: str, seed: int) -> dict:
    """One cold and one warm mining run on the corpus of ``size`` documents (in this process)."""
    from hfemb.mining.mine import MiningConfig, mine

    records = real_records(DATA)
    t0 = time.perf_counter()
    corpus = build_corpus(records, size, seed)
    build_seconds = time.perf_counter() - t0
    rng = np.random.default_rng(seed + 1)
    sample = [records[i] for i in sorted(rng.choice(len(records), size=n_queries, replace=False))]
    log(f"{size}: corpus built in {build_seconds:.1f} s, mean {np.mean([len(d) for d in corpus]):.0f} chars")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    runs = []
    for attempt in ("cold", "warm"):
        config = MiningConfig(mode="corpus", tokenizer="jieba", workers=workers, cache_dir=cache_dir, seed=seed)
        t0 = time.perf_counter()
        result = mine(sample, config, corpus=corpus)
        seconds = time.perf_counter() - t0
        rep = result.report
        runs.append({
            "run": attempt, "seconds": round(seconds, 1), "tokenization": rep["tokenization"],
            "index_seconds": rep["index_seconds"], "scoring_seconds": rep["scoring_seconds"],
            "selection_seconds": rep["selection_seconds"], "rows": rep["rows_written"],
            "negatives": rep["negatives"], "vocabulary": rep["vocabulary"], "documents": rep["documents"],
            "per_query_ms": round(1000 * (rep["scoring_seconds"] + rep["selection_seconds"]) / len(sample), 2),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        })
        log(f"{size} {attempt}: {json.dumps(runs[-1])}")
        del result
    return {"size": size, "queries": n_queries, "corpus_seconds": round(build_seconds, 1),
            "rss_after_corpus_gb": round(rss_before, 2), "runs": runs,
            "jieba_workers_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000], help="corpus sizes")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="jieba processes")
    parser.add_argument("--cache-dir", default="/tmp/hfemb_bench_tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="bench/results/mining_scale.json")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one size, in this process
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.queries, args.workers, args.cache_dir, args.seed)))
        return

    load = common.load_averages()
    log(f"load average {' '.join(load)}")
    results = []
    for size in args.sizes:
        cache = Path(args.cache_dir) / str(size)  # cold = really cold
        shutil.rmtree(cache, ignore_errors=True)
        results.append(common.child_json([__file__, "--child", str(size), "--queries", str(args.queries),
                                          "--workers", str(args.workers), "--cache-dir", str(cache),
                                          "--seed", str(args.seed)]))
        shutil.rmtree(cache, ignore_errors=True)
        common.save_results(args.output, load, results)

    print(f"\nhfemb mine, corpus mode, jieba, {args.queries} queries, {args.workers} jieba workers "
          f"(load average at start {' '.join(load)}):\n")
    print("| documents | tokenise cold (s) | index (s) | per query: score + select (ms) | "
          "per query per 1M documents (ms) | total warm (s) | peak RSS (GB) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        cold, warm = r["runs"]
        score, select = (1000 * warm[k] / r["queries"] for k in ("scoring_seconds", "selection_seconds"))
        print(f"| {r['size']:,} | {cold['tokenization']['seconds']:.0f} | {warm['index_seconds']:.1f} | "
              f"{warm['per_query_ms']:.1f} = {score:.1f} + {select:.1f} | "
              f"{warm['per_query_ms'] * 1e6 / r['size']:.0f} | {warm['seconds']:.0f} | "
              f"{max(cold['peak_rss_gb'], warm['peak_rss_gb']):.2f} |")
    print(f"\nvocabulary {results[-1]['runs'][1]['vocabulary']:,} words; jieba workers' peak RSS "
          f"{max(r['jieba_workers_peak_rss_gb'] for r in results):.2f} GB")
    print(f"\ncommand: python bench/bench_mining_scale.py --sizes {' '.join(map(str, args.sizes))} --queries {args.queries} --workers {args.workers}")


if __name__ == "__main__":
    main()
