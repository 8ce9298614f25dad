"""Mining at corpus scale: `hfemb.mining.mine` (corpus mode, jieba, the default 1 hard + 2 easy recipe) on
synthetic Chinese corpora up to 1M documents: time, peak memory, per-query cost.

    python bench/bench_mining_scale.py [--sizes 100000 300000] [--intern-sizes 100000 1000000] [--queries 1000]

Corpus of N documents: the 11,692 real answers of ../shared/data/zh_medical_qa (CSV + short txt), then
distinct synthetic documents, each 2-4 sentences (uniform) drawn with replacement, seeded, from the 19.8k
distinct sentences of those answers (split after 。！？!?；;) -- about as long as a real answer (~150
characters) and with its vocabulary. Queries: a seeded sample of the real questions; their own answers are
in the corpus (excluded as positives, as in a real run).

Each size runs in a fresh subprocess, twice: cold (parallel jieba, writes a fresh token cache) and warm
(reads it). Peak memory is that process's resident-set high-water mark (``ru_maxrss``; the jieba worker
processes are reported apart). ``--intern-sizes`` runs with the proposed memory fix (`intern_tokens`):
hfemb as it is would need ~14 GB at 1M documents (extrapolated linearly from 1.5 GB at 100k and 4.3 GB at
300k), more than this shared machine can spare.
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
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "zh_medical_qa"
SENTENCE_END = re.compile(r"(?<=[。！？!?；;])")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def real_records(data: Path):
    from hfemb.data import read_records

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


def intern_tokens() -> None:
    """The proposed memory fix, measured with ``--intern-sizes``: `hfemb.bm25` splits each document's joined
    tokens into new ``str`` objects (~80 bytes per Chinese word, ~90 bytes per token with its list slot: ~8 GB
    of token lists at 1M documents); sharing one object per distinct token (a vocabulary of ~17k) leaves the
    8-byte list slots. Here ``_tokenize_parallel`` and ``_load_cache`` are replaced by copies that split
    through an intern table (hfemb.bm25 is not this benchmark's file to change)."""
    import multiprocessing

    from hfemb import bm25

    def split_interned(joined_docs):
        table: dict[str, str] = {}
        return [[table.setdefault(t, t) for t in doc.split(" ")] if doc else [] for doc in joined_docs]

    def tokenize_parallel(texts, workers):
        bm25._init_jieba_worker()
        chunks = [texts[i:i + bm25._PARALLEL_CHUNK] for i in range(0, len(texts), bm25._PARALLEL_CHUNK)]
        with multiprocessing.get_context().Pool(min(workers, len(chunks)), initializer=bm25._init_jieba_worker) as pool:
            parts = pool.map(bm25._jieba_joined, chunks, chunksize=1)
        return split_interned(doc for part in parts for doc in part)

    def load_cache(path, n):
        try:
            with open(path, encoding="utf-8") as fh:
                docs = json.load(fh)["docs"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return split_interned(docs) if isinstance(docs, list) and len(docs) == n else None

    bm25._tokenize_parallel, bm25._load_cache = tokenize_parallel, load_cache


def measure(size: int, n_queries: int, workers: int, cache_dir: str, seed: int, intern: bool = False) -> dict:
    """One cold and one warm mining run on the corpus of ``size`` documents (in this process)."""
    from hfemb.mining import MiningConfig, mine

    if intern:
        intern_tokens()

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
    return {"size": size, "queries": n_queries, "interned": intern, "corpus_seconds": round(build_seconds, 1),
            "rss_after_corpus_gb": round(rss_before, 2), "runs": runs,
            "jieba_workers_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 300_000],
                        help="corpus sizes mined by hfemb as it is")
    parser.add_argument("--intern-sizes", type=int, nargs="*", default=[100_000, 1_000_000],
                        help="corpus sizes mined with interned tokens (the proposed memory fix, see intern_tokens)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="jieba processes")
    parser.add_argument("--cache-dir", default="/tmp/hfemb_bench_tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="bench/results/mining_scale.json")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one size, in this process
    parser.add_argument("--child-intern", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.queries, args.workers, args.cache_dir, args.seed,
                                 intern=args.child_intern)))
        return

    load = Path("/proc/loadavg").read_text().split()[:3]
    log(f"load average {' '.join(load)}")
    results = []
    for size, intern in [(n, False) for n in args.sizes] + [(n, True) for n in args.intern_sizes]:
        cache = Path(args.cache_dir) / f"{size}-{'interned' if intern else 'plain'}"  # cold = really cold
        shutil.rmtree(cache, ignore_errors=True)
        cmd = [sys.executable, __file__, "--child", str(size), "--queries", str(args.queries),
               "--workers", str(args.workers), "--cache-dir", str(cache), "--seed", str(args.seed)]
        proc = subprocess.run(cmd + (["--child-intern"] if intern else []), stdout=subprocess.PIPE, text=True,
                              check=True)
        shutil.rmtree(cache, ignore_errors=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"load": load, "results": results}, indent=1))

    print(f"\nhfemb mine, corpus mode, jieba, {args.queries} queries, {args.workers} jieba workers "
          f"(load average at start {' '.join(load)}):\n")
    print("| documents | tokens interned | tokenise cold (s) | index (s) | per query: score + select (ms) | "
          "per query per 1M documents (ms) | total warm (s) | peak RSS (GB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        cold, warm = r["runs"]
        score, select = (1000 * warm[k] / r["queries"] for k in ("scoring_seconds", "selection_seconds"))
        print(f"| {r['size']:,} | {'yes (proposed fix)' if r['interned'] else 'no (as is)'} | "
              f"{cold['tokenization']['seconds']:.0f} | {warm['index_seconds']:.1f} | "
              f"{warm['per_query_ms']:.1f} = {score:.1f} + {select:.1f} | "
              f"{warm['per_query_ms'] * 1e6 / r['size']:.0f} | {warm['seconds']:.0f} | "
              f"{max(cold['peak_rss_gb'], warm['peak_rss_gb']):.2f} |")
    print(f"\nvocabulary {results[-1]['runs'][1]['vocabulary']:,} words; jieba workers' peak RSS "
          f"{max(r['jieba_workers_peak_rss_gb'] for r in results):.2f} GB")
    print(f"\ncommand: python bench/bench_mining_scale.py --sizes {' '.join(map(str, args.sizes))} --intern-sizes "
          f"{' '.join(map(str, args.intern_sizes))} --queries {args.queries} --workers {args.workers}")


if __name__ == "__main__":
    main()
